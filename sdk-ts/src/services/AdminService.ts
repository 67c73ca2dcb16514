import type { SendOptions, VskiClient } from "../Client";

export interface AdminModel {
  id: string;
  email: string;
  created: string;
  updated: string;
  [key: string]: any;
}

export interface AdminAuthResponse {
  token: string;
  admin: AdminModel;
}

/** `/api/admins/*`: the first admin, and admin sign-in. */
export class AdminService {
  constructor(private readonly client: VskiClient) {}

  /** Whether any admin exists yet. */
  async hasAdmins(options: SendOptions = {}): Promise<boolean> {
    const r = await this.client.send<{ hasAdmins: boolean }>("/api/admins/has-admins", { ...options, method: "GET" });
    return r.hasAdmins === true;
  }

  /**
   * Creates the first admin and signs in as it. `installToken` is the one-time token the server
   * keeps in `DATA_DIR/.install_token` (and prints at start) while no admin exists; 401 without
   * it, 400 once an admin exists.
   */
  async init(email: string, password: string, installToken: string, options: SendOptions = {}): Promise<AdminAuthResponse> {
    const auth = await this.client.send<AdminAuthResponse>("/api/admins/init", {
      ...options,
      method: "POST",
      body: { email, password },
      headers: { ...options.headers, Authorization: `Bearer ${installToken}` },
    });
    this.client.authStore.save(auth.token, auth.admin);
    return auth;
  }

  /** Signs in as an admin; the token (valid in every database) goes to the auth store. */
  async authWithPassword(email: string, password: string, options: SendOptions = {}): Promise<AdminAuthResponse> {
    const auth = await this.client.send<AdminAuthResponse>("/api/admins/auth-with-password", {
      ...options,
      method: "POST",
      body: { identity: email, password },
    });
    this.client.authStore.save(auth.token, auth.admin);
    return auth;
  }

  /** The signed-in admin. */
  async me(options: SendOptions = {}): Promise<AdminModel> {
    return this.client.send<AdminModel>("/api/admins/me", { ...options, method: "GET" });
  }
}
