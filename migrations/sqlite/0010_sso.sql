-- Single sign-on: identity providers (generic OIDC, GitHub) and the accounts they vouch for.
--
-- issuer is the OIDC issuer URL, or GitHub's base URL (https://github.com, or a GitHub
-- Enterprise server). client_secret_sealed is sealed with control's secrets key. scopes and
-- default_roles are JSON arrays; role_map a JSON object from a claim value (OIDC: a value of
-- role_claim; GitHub: "org" or "org/team") to role names. When role_map is not empty, a user's
-- roles follow the provider at every sign-in.
CREATE TABLE identity_providers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    display_name TEXT NOT NULL,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_sealed TEXT NOT NULL,
    scopes TEXT NOT NULL,
    role_claim TEXT,
    role_map TEXT NOT NULL,
    default_roles TEXT NOT NULL,
    auto_provision BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

-- Which user an account at a provider is (the provider's stable subject, never the e-mail).
CREATE TABLE user_identities (
    provider_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (provider_id, subject)
);
CREATE INDEX user_identities_user ON user_identities (user_id);
