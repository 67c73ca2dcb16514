//! Bringing apps over from elsewhere. Knows nothing of the server's internals: it talks to a
//! running vski through its HTTP API, as any client would.

pub mod pocketbase;
