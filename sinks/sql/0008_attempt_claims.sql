-- 0008_attempt_claims: which PSP each attempt id was first sent to (psp/claims.py).
--
-- Written right before the PSP call; an attempt is only ever re-sent to its owner, so a
-- re-run after a crash can never fail it over to a second PSP (a second charge). Kept in
-- PostgreSQL because a Redis flush must not forget them. Released (deleted) only when the
-- call certainly did not reach the PSP.
CREATE TABLE IF NOT EXISTS attempt_claims (
    attempt_id  text        PRIMARY KEY,
    psp         text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
