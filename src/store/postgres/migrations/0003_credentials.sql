
-- Credentials pollhook keeps for itself (rotated OAuth2 refresh tokens);
-- never exported.
CREATE TABLE credentials (
    key text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
