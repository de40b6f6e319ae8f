"""Append-only, named schema migrations, run on every open.

Each migration is a function registered in order with @migration; its name is recorded in `_migrations` when
it has run. Never edit or reorder a released migration: add a new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIGRATIONS: list[Callable] = []


def migration(fn: Callable) -> Callable:
    MIGRATIONS.append(fn)
    return fn


def migrate(db) -> list[str]:
    """Run the migrations `db` has not seen yet, each in its own transaction. Returns their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        # One transaction per migration, the record included: a crash leaves it fully applied or not at all.
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (fn.__name__, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(fn.__name__)
    return applied


def run_script(db, sql: str) -> None:
    """Execute several statements inside the caller's transaction.

    sqlite3's executescript() would COMMIT first, breaking the one-transaction-per-migration rule.
    """
    for statement in sql.split(";"):
        if statement.strip() and not all(l.strip().startswith("--") or not l.strip() for l in statement.splitlines()):
            db.execute(statement)


@migration
def m001_initial(db) -> None:
    run_script(
        db,
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,                 -- short stable id, e.g. user_3f2a...
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            privacy_tier INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE tokens (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            token_sha256 TEXT NOT NULL UNIQUE,   -- only the hash of a bearer token is stored
            label TEXT,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            source TEXT NOT NULL,                -- api | ws | interactions | import:<format>
            external_id TEXT,
            title TEXT,
            context TEXT,                        -- JSON from the client (seed's interaction context)
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX conversations_user ON conversations(user_id, created_at);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            parent_id TEXT REFERENCES messages(id) ON DELETE SET NULL,
            position INTEGER NOT NULL,           -- 0-based turn index in its conversation
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            model TEXT,
            source TEXT NOT NULL,
            chain_sha256 TEXT NOT NULL,          -- hash of this message and all before it: idempotent capture
            created_at REAL NOT NULL,
            UNIQUE (user_id, chain_sha256)
        );
        CREATE INDEX messages_conversation ON messages(conversation_id, position);
        CREATE INDEX messages_user_time ON messages(user_id, created_at);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            thumbs INTEGER CHECK (thumbs IN (-1, 1)),
            rating INTEGER CHECK (rating BETWEEN 1 AND 5),
            edited_content TEXT,                 -- a better reply written by the user
            comment TEXT,
            created_at REAL NOT NULL
        );
        CREATE INDEX feedback_message ON feedback(message_id);
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            user_id TEXT,                        -- kept after the user's data is deleted, never content
            at REAL NOT NULL,
            action TEXT NOT NULL,                -- imported | captured | deleted | trained | token_created ...
            detail TEXT NOT NULL                 -- JSON: counts, ids, hashes, never message text
        );
        CREATE INDEX audit_user ON audit(user_id, at);
        """
    )


@migration
def m002_datasets(db) -> None:
    run_script(
        db,
        """
        CREATE TABLE datasets (
            id TEXT PRIMARY KEY,                 -- ds_YYYYMMDD_HHMMSS_xxxx
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            merkle_root TEXT NOT NULL,
            n_train INTEGER NOT NULL,
            n_heldout INTEGER NOT NULL,
            config TEXT NOT NULL,                -- JSON DatasetConfig
            stats TEXT NOT NULL                  -- JSON counts
        );
        CREATE INDEX datasets_user ON datasets(user_id, created_at);
        CREATE TABLE dataset_examples (
            dataset_id TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,                -- leaf position in the Merkle tree
            split TEXT NOT NULL CHECK (split IN ('train', 'heldout')),
            augmented INTEGER NOT NULL DEFAULT 0,
            conversation_id TEXT NOT NULL,       -- not a foreign key: the hash outlives a deleted conversation
            sha256 TEXT NOT NULL,
            messages TEXT,                       -- JSON, NULL once the conversation was deleted
            PRIMARY KEY (dataset_id, idx)
        );
        CREATE INDEX dataset_examples_conversation ON dataset_examples(conversation_id)
        """,
    )


@migration
def m003_keys_and_models(db) -> None:
    run_script(
        db,
        """
        CREATE TABLE node_key (
            id INTEGER PRIMARY KEY CHECK (id = 1),  -- one HPKE key pair per node
            mlkem_seed BLOB NOT NULL,
            x25519 BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE signing_keys (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            key_id TEXT NOT NULL UNIQUE,
            alg TEXT NOT NULL,
            public_pem TEXT NOT NULL,
            private_der BLOB NOT NULL,           -- PKCS8, inside the encrypted database
            created_at REAL NOT NULL
        );
        CREATE TABLE trusted_signers (
            key_id TEXT PRIMARY KEY,
            alg TEXT NOT NULL,
            public_pem TEXT NOT NULL,
            label TEXT,
            added_at REAL NOT NULL
        );
        CREATE TABLE models (
            id TEXT NOT NULL,                    -- the manifest's model.id (pm_YYYY_MM_DD_HH_MM_vN)
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            previous TEXT,
            path TEXT NOT NULL,                  -- directory under home/models
            size_bytes INTEGER NOT NULL,
            signer_key_id TEXT NOT NULL,
            manifest TEXT NOT NULL,              -- JSON, as signed
            installed_at REAL NOT NULL,
            PRIMARY KEY (user_id, id),
            UNIQUE (user_id, version)
        );
        CREATE TABLE routing (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            model_id TEXT,                       -- NULL: the base model
            updated_at REAL NOT NULL,
            FOREIGN KEY (user_id, model_id) REFERENCES models(user_id, id)
        )
        """,
    )


@migration
def m004_jobs(db) -> None:
    run_script(
        db,
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'deployed', 'refused', 'failed')),
            stage TEXT,                          -- dataset | train | compress | gate | bundle | deploy
            progress REAL NOT NULL DEFAULT 0,    -- 0..1 within the stage
            reason TEXT,                         -- why it was started, or why it was refused / failed
            watermark INTEGER,                   -- highest message rowid the job's dataset saw
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            result TEXT                          -- JSON: losses, gate figures, model id, sizes
        );
        CREATE INDEX jobs_user ON jobs(user_id, created_at);
        CREATE UNIQUE INDEX jobs_one_open_per_user ON jobs(user_id) WHERE state IN ('queued', 'running');
        CREATE TABLE loop_state (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            next_run_at REAL
        )
        """,
    )


@migration
def m005_job_lease(db) -> None:
    # Which process owns an open job, until when (issue #14: `ownlm train` beside `ownlm serve` ran one job twice).
    # owner is "host:pid:nonce"; a job nobody renews past lease_until may be taken over. NULL: nobody yet.
    run_script(
        db,
        """
        ALTER TABLE jobs ADD COLUMN owner TEXT;
        ALTER TABLE jobs ADD COLUMN lease_until REAL
        """,
    )


@migration
def m006_model_paths_relative(db) -> None:
    """Model paths become relative to the home (`models/<user id>/<model id>`), so a moved, copied or restored
    home keeps its models. Every row was installed at exactly that place under whatever home it had then, so
    the path is derived from the row's own ids: no need to know the old home."""
    db.execute("UPDATE models SET path = 'models/' || user_id || '/' || id")


@migration
def m007_signer_users(db) -> None:
    """Trusted signers are bound to users: a key signs only for the users it is trusted for (a user's own
    signing key always signs for that user, from `signing_keys`)."""
    run_script(
        db,
        """
        CREATE TABLE trusted_signer_users (
            key_id TEXT NOT NULL,                -- trusted_signers.key_id
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            added_at REAL NOT NULL,
            PRIMARY KEY (key_id, user_id)
        )
        """,
    )
    # Keys trusted before the binding existed were trusted for every user. With one user that meant exactly
    # that user, so the binding keeps it working; with several, nobody can tell whom the trust was meant for:
    # those keys sign for no one until `ownlm trust add FILE --user NAME` says so.
    users = [r[0] for r in db.execute("SELECT id FROM users")]
    if len(users) == 1:
        db.execute(
            "INSERT INTO trusted_signer_users (key_id, user_id, added_at) SELECT key_id, ?, added_at FROM trusted_signers"
            " WHERE key_id NOT IN (SELECT key_id FROM signing_keys)", (users[0],),
        )


@migration
def m008_live_threads(db) -> None:
    # Live capture (a request that names no conversation) gives each new chat its own chain seed, so two chats
    # that open alike stay apart; a re-sent history finds its conversation again by this content-only chain
    # (seed "live", not unique). Before this migration live chats were chained from the seed "live" itself,
    # so their chain already is their thread hash.
    run_script(
        db,
        """
        ALTER TABLE messages ADD COLUMN thread_sha256 TEXT;
        UPDATE messages SET thread_sha256 = chain_sha256 WHERE conversation_id IN
            (SELECT id FROM conversations WHERE source IN ('api', 'interactions') AND external_id IS NULL);
        CREATE INDEX messages_thread ON messages(user_id, thread_sha256) WHERE thread_sha256 IS NOT NULL;
        -- which stored message has a reply (capture_live prefers one without it), and what deleting a
        -- message looks up to null its replies' parent_id
        CREATE INDEX messages_parent ON messages(parent_id)
        """,
    )


@migration
def m009_augmentation(db) -> None:
    # Knowledge augmentation (issue #16): an augmented example records the train example it was made from
    # (its sha256) and its kind ('context', 'paraphrase', 'reorder'); NULL for an original. Before this
    # migration the last-exchange-alone variant was the only kind, so the augmented rows recorded so far are
    # 'context' variants; their source hash was never stored and stays unknown (NULL).
    run_script(
        db,
        """
        ALTER TABLE dataset_examples ADD COLUMN source_sha256 TEXT;
        ALTER TABLE dataset_examples ADD COLUMN augmentation TEXT;
        UPDATE dataset_examples SET augmentation = 'context' WHERE augmented = 1
        """,
    )


@migration
def m010_memory(db) -> None:
    """The memory index (issue #18, store/memory.py): passages of one user turn and its reply, redacted, with
    two FTS5 indexes kept in step by triggers; each user's own memory switch (NULL: the node's default).
    Stores made before it get the passages of every stored reply now."""
    from ownlm.store.memory import reindex

    run_script(
        db,
        """
        ALTER TABLE users ADD COLUMN memory INTEGER CHECK (memory IN (0, 1));  -- NULL: settings.memory.enabled
        CREATE TABLE memory_passages (
            id INTEGER PRIMARY KEY,              -- the rowid of both FTS5 indexes
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            question_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            answer_id TEXT NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
            question TEXT NOT NULL,              -- redacted, at most memory.PASSAGE_CHARS
            answer TEXT NOT NULL,
            spaceless INTEGER NOT NULL,          -- 1: holds Thai/CJK/... text, so memory_trigram indexes it too
            created_at REAL NOT NULL
        );
        CREATE INDEX memory_passages_user ON memory_passages(user_id);
        CREATE INDEX memory_passages_conversation ON memory_passages(conversation_id);
        CREATE INDEX memory_passages_question ON memory_passages(question_id);
        -- the trigram index's content: only passages in a script written without spaces (see store/memory.py)
        CREATE VIEW memory_spaceless AS SELECT id, question, answer FROM memory_passages WHERE spaceless = 1;
        CREATE VIRTUAL TABLE memory_fts USING fts5(question, answer, content='memory_passages', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2');
        CREATE VIRTUAL TABLE memory_trigram USING fts5(question, answer, content='memory_spaceless', content_rowid='id',
            tokenize='trigram remove_diacritics 1');
        -- bulk = 1 only inside a transaction that deletes many passages and then rebuilds both indexes
        -- (memory.forget_passages): the per-row delete triggers are skipped there
        CREATE TABLE memory_state (id INTEGER PRIMARY KEY CHECK (id = 1), bulk INTEGER NOT NULL);
        INSERT INTO memory_state (id, bulk) VALUES (1, 0);
        -- a delete removes the terms from the index pages at once, not only a tombstone (the right to delete)
        INSERT INTO memory_fts(memory_fts, rank) VALUES ('secure-delete', 1);
        INSERT INTO memory_trigram(memory_trigram, rank) VALUES ('secure-delete', 1)
        """,
    )
    # Triggers hold ';' inside BEGIN ... END, which run_script would split: one execute each. Passages are never
    # updated (a changed passage is deleted and inserted), so insert and delete keep the indexes in step; a
    # cascade from a deleted message or conversation fires the delete trigger too.
    per_row = "(SELECT bulk FROM memory_state) = 0"
    for name, event, when, body in (
        ("memory_fts_insert", "INSERT", "", "INSERT INTO memory_fts(rowid, question, answer) VALUES (new.id, new.question, new.answer)"),
        ("memory_fts_delete", "DELETE", f"WHEN {per_row}", "INSERT INTO memory_fts(memory_fts, rowid, question, answer)"
                                                           " VALUES ('delete', old.id, old.question, old.answer)"),
        ("memory_trigram_insert", "INSERT", "WHEN new.spaceless",
         "INSERT INTO memory_trigram(rowid, question, answer) VALUES (new.id, new.question, new.answer)"),
        ("memory_trigram_delete", "DELETE", f"WHEN old.spaceless AND {per_row}",
         "INSERT INTO memory_trigram(memory_trigram, rowid, question, answer) VALUES ('delete', old.id, old.question, old.answer)"),
    ):
        db.execute(f"CREATE TRIGGER {name} AFTER {event} ON memory_passages {when} BEGIN {body}; END")
    reindex(db)


@migration
def m011_user_dp(db) -> None:
    """A user's own differential-privacy choice for their local rounds (learn/dp.py): NULL follows the node's
    personalization.dp_epsilon, 0 is off, a positive number is the epsilon each round may spend."""
    db.execute("ALTER TABLE users ADD COLUMN dp_epsilon REAL")


@migration
def m012_he_keys(db) -> None:
    """A person's CKKS key pair for tier-3 encrypted aggregation (privacy/secure_agg.py): the secret context
    lives here, encrypted at rest with the rest of the store; the public one is what devices and aggregators get."""
    run_script(db, """
        CREATE TABLE he_keys (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            key_id TEXT NOT NULL,
            params TEXT NOT NULL,
            secret_context BLOB NOT NULL,
            public_context BLOB NOT NULL,
            created_at REAL NOT NULL
        );
    """)


@migration
def m013_community(db) -> None:
    """The community model (privacy/community.py), both opt-in and off by default: `community_contribute` 1 lets
    this user's DP-noised, pairwise-masked update join community rounds (tiers 0 and 3 only); `community_start` 1
    lets this user's first round start from the node's community adapter."""
    db.execute("ALTER TABLE users ADD COLUMN community_contribute INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE users ADD COLUMN community_start INTEGER NOT NULL DEFAULT 0")
