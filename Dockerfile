# vski: a multi-stage build. The runtime image holds the binary and CA certificates only,
# runs as a non-root user, keeps its data in the /data volume and reports health with
# `vski healthcheck` (GET /health: 503 until a replica holds data).
#
#   docker build -t vski .
#   docker run -p 3000:3000 -v vski-data:/data vski
#
# syntax=docker/dockerfile:1
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY server server
COPY tests tests
RUN cargo build --release --locked -p vski \
    && strip target/release/vski

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin vski \
    && install -d -o vski -g vski -m 0700 /data
COPY --from=build /src/target/release/vski /usr/local/bin/vski
USER vski
ENV DATA_DIR=/data HOST=0.0.0.0 PORT=3000 RUST_LOG=info
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["vski", "healthcheck"]
ENTRYPOINT ["vski"]
CMD ["serve"]
