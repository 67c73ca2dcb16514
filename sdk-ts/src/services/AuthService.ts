import type { RecordModel, SendOptions, VskiClient } from "../Client";
import type { RecordAuthResponse } from "./RecordService";

/** `/api/auth/*`: sign-in, sign-up and "me" on the database's `users` collection (VSKI style). */
export class AuthService {
  constructor(private readonly client: VskiClient) {}

  async login(email: string, password: string, options: SendOptions = {}): Promise<RecordAuthResponse> {
    const auth = await this.client.send<RecordAuthResponse>("/api/auth/login", {
      ...options,
      method: "POST",
      body: { identity: email, password },
    });
    this.client.authStore.save(auth.token, auth.record);
    return auth;
  }

  /** Signs up (`email`, `password`, `passwordConfirm`, other fields) and signs in. */
  async register(data: { [key: string]: any }, options: SendOptions = {}): Promise<RecordAuthResponse> {
    const auth = await this.client.send<RecordAuthResponse>("/api/auth/register", {
      ...options,
      method: "POST",
      body: data,
    });
    this.client.authStore.save(auth.token, auth.record);
    return auth;
  }

  async me(options: SendOptions = {}): Promise<RecordModel> {
    return this.client.send<RecordModel>("/api/auth/me", { ...options, method: "GET" });
  }

  /** Forgets the token. */
  logout(): void {
    this.client.authStore.clear();
  }
}
