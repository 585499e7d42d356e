"""Token store section: HMAC-hashed tokens in tokens.json, the hash key, file modes, at-rest
encryption, concurrent writers (real OS processes), stat-based reload, prefix lookup."""
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import subprocess
import time

import pytest

import tokenomics
import tokenomics.config
import tokenomics.errors
import tokenomics.providers
import tokenomics.store
from tokenomics.errors import RuntimeFailure, UsageError

from conftest import TOKENOMICS, base_env

RAW_KEY = "0123456789abcdef" * 4                  # 64 hex chars: a raw AES-256 key
OTHER_RAW_KEY = "fedcba9876543210" * 4
PASSPHRASE = "correct horse battery staple"
DISTINCT_MODEL = "zebra-unicorn-model-7731"
DISTINCT_TAG = "falcon-team-secret-tag"
TOKEN_RE = re.compile(r"^tkn_[0-9a-f]{32}$")


@pytest.fixture
def config(data_dir):
    return tokenomics.config.Config(dir=str(data_dir))


@pytest.fixture
def catalog():
    return tokenomics.providers.Catalog(environ={})


@pytest.fixture
def new_store(config, catalog):
    def make(cfg=None, **environ):
        return tokenomics.store.TokenStore(cfg or config, catalog, environ=dict(environ))
    return make


def files_in(directory):
    for root, _, names in os.walk(directory):
        for name in names:
            yield os.path.join(root, name)


def tokens_doc(data_dir) -> dict:
    return json.loads((data_dir / "tokens.json").read_text())


def write_tokens_doc(data_dir, doc) -> None:
    (data_dir / "tokens.json").write_text(json.dumps(doc))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- tokens and hashes ------------------------------------------------------------------------

def test_create_returns_a_tkn_token_and_stores_only_its_hmac(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="the-hash-key")
    token, record = store.create({"model": "gpt-4o"}, label="ci")
    assert TOKEN_RE.match(token)
    expected = hmac.new(b"the-hash-key", token.encode(), hashlib.sha256).hexdigest()
    assert record.hash == expected
    assert record.label == "ci"
    assert expected in (data_dir / "tokens.json").read_text()
    for path in files_in(data_dir):
        with open(path, "rb") as fh:
            content = fh.read()
        assert token.encode() not in content, f"raw token leaked into {path}"
        assert token[4:].encode() not in content, f"raw token leaked into {path}"


def test_tokens_are_unique(new_store):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    tokens = {store.create({})[0] for _ in range(20)}
    assert len(tokens) == 20


def test_lookup_finds_the_token_and_nothing_else(new_store):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    token, record = store.create({"model": "gpt-4o", "max_tokens": 1000})
    found = store.lookup(token)
    assert found is not None and found.hash == record.hash
    assert found.policy.model == "gpt-4o" and found.policy.max_tokens == 1000
    assert store.lookup("tkn_" + "0" * 32) is None
    assert store.lookup(token + "x") is None
    # a store opened later (another process) finds it too
    again = new_store(TOKENOMICS_HASH_KEY="k").lookup(token)
    assert again is not None and again.policy.raw == {"model": "gpt-4o", "max_tokens": 1000}


def test_a_token_created_elsewhere_a_moment_ago_is_found_on_its_first_use(new_store):
    serving = new_store(TOKENOMICS_HASH_KEY="k")
    now = time.time()
    serving.refresh(now)                                  # the proxy looked a moment ago
    token, _ = new_store(TOKENOMICS_HASH_KEY="k").create({"max_tokens": 130})   # `token create`
    serving.refresh(now + 0.01)                           # within the reload interval: not looked at
    assert serving.lookup(token) is None
    found = serving.authenticate(token, now + 0.01)
    assert found is not None and found.policy.max_tokens == 130


def test_unknown_tokens_do_not_make_a_broken_tokens_file_be_read_again_and_again(new_store, data_dir, caplog):
    serving = new_store(TOKENOMICS_HASH_KEY="k")
    token, _ = serving.create({})
    now = time.time()
    serving.refresh(now)
    (data_dir / "tokens.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="tokenomics"):
        for i in range(20):
            assert serving.authenticate("tkn_" + "1" * 32, now + i * 0.001) is None
    failures = [r for r in caplog.records if "token store reload failed" in r.getMessage()]
    assert len(failures) == 1
    assert serving.authenticate(token, now + 0.1) is not None     # the tokens it had are kept


def test_hash_key_from_env_creates_no_key_file(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="env-key")
    token, _ = store.create({})
    assert not (data_dir / "hash.key").exists()
    # a different hash key does not recognise the token, and says so (§3: the key-check value)
    with pytest.raises(tokenomics.store.HashKeyMismatch, match="hash key does not match"):
        new_store(TOKENOMICS_HASH_KEY="another-key")
    assert new_store(TOKENOMICS_HASH_KEY="env-key").lookup(token) is not None


def test_hash_key_env_name_comes_from_the_config(new_store, config, data_dir):
    cfg = dataclasses.replace(config, security=tokenomics.config.SecurityConfig(hash_key_env="MY_HASH_KEY"))
    token, record = new_store(cfg, MY_HASH_KEY="custom").create({})
    assert record.hash == hmac.new(b"custom", token.encode(), hashlib.sha256).hexdigest()
    assert not (data_dir / "hash.key").exists()


def test_generated_hash_key_is_private_and_reused(new_store, data_dir):
    store = new_store()
    token, record = store.create({})
    key_file = data_dir / "hash.key"
    assert key_file.exists()
    assert mode(key_file) == 0o600
    key = key_file.read_bytes()
    assert len(key.strip()) >= 32
    # next start: same key, token still works, the file is unchanged
    again = new_store()
    assert again.lookup(token) is not None
    assert key_file.read_bytes() == key
    assert record.hash == hmac.new(key.strip(), token.encode(), hashlib.sha256).hexdigest()


def test_an_empty_hash_key_file_is_never_used_as_an_empty_key(new_store, data_dir):
    """A zero-length hash.key (a crash between creating and writing it, or a process that read it
    while another was still writing it) must not make tokens hash with an empty HMAC key."""
    (data_dir / "hash.key").write_bytes(b"")
    try:
        token, record = new_store().create({})
    except tokenomics.errors.TokenomicsError as exc:  # refusing with a clear message is acceptable too
        assert "hash" in str(exc).lower()
        return
    assert record.hash != hmac.new(b"", token.encode(), hashlib.sha256).hexdigest()


def test_generated_hash_key_differs_per_data_dir(config, catalog, tmp_path):
    a = tokenomics.store.TokenStore(dataclasses.replace(config, dir=str(tmp_path / "a")), catalog, environ={})
    b = tokenomics.store.TokenStore(dataclasses.replace(config, dir=str(tmp_path / "b")), catalog, environ={})
    token, _ = a.create({})
    assert b.lookup(token) is None
    assert (tmp_path / "a" / "hash.key").read_bytes() != (tmp_path / "b" / "hash.key").read_bytes()


def test_data_files_are_mode_0600_whatever_the_umask(new_store, data_dir):
    old = os.umask(0)
    try:
        store = new_store()
        store.create({})
        store.create({}, label="second")
    finally:
        os.umask(old)
    names = {os.path.basename(p) for p in files_in(data_dir)}
    assert {"tokens.json", "hash.key"} <= names
    assert len(names) >= 3, f"expected a lock file too, got {names}"
    for path in files_in(data_dir):
        assert mode(path) == 0o600, f"{path} is {oct(mode(path))}"


def test_data_files_stay_0600_with_encryption(new_store, data_dir):
    old = os.umask(0)
    try:
        new_store(TOKENOMICS_ENCRYPTION_KEY=RAW_KEY).create({"model": DISTINCT_MODEL})
    finally:
        os.umask(old)
    for path in files_in(data_dir):
        assert mode(path) == 0o600, f"{path} is {oct(mode(path))}"


def test_invalid_policy_is_rejected_and_nothing_is_stored(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    with pytest.raises(UsageError) as exc:
        store.create({"max_tokens": "lots"})
    assert "max_tokens" in str(exc.value)
    assert store.records() == []
    if (data_dir / "tokens.json").exists():
        assert tokens_doc(data_dir)["tokens"] == []


def test_records_carry_created_and_expiry(new_store):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    before = time.time()
    _, record = store.create({}, expires_at=before + 3600)
    assert before - 2 <= record.created_at <= time.time() + 2
    assert abs(record.expires_at - (before + 3600)) <= 1
    assert not record.expired(before)
    assert record.expired(before + 3601)
    data = record.to_json(before)
    assert set(data) == {"hash", "label", "created_at", "expires_at", "expired", "policy"}


# --- encryption at rest -----------------------------------------------------------------------

SECRET_POLICY = {"model": DISTINCT_MODEL, "metadata": {"team": DISTINCT_TAG},
                 "prompts": [{"role": "system", "content": "be terse"}]}


@pytest.mark.parametrize("secret", [RAW_KEY, PASSPHRASE], ids=["raw-key", "passphrase"])
def test_encrypted_store_holds_no_policy_plaintext_and_reads_back(new_store, data_dir, secret):
    store = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=secret)
    token, record = store.create(SECRET_POLICY, label="enc")
    raw = (data_dir / "tokens.json").read_text()
    assert DISTINCT_MODEL not in raw
    assert DISTINCT_TAG not in raw
    assert "be terse" not in raw
    assert secret not in raw
    assert record.hash in raw  # the hash stays readable so records can be found
    reopened = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=secret)
    found = reopened.lookup(token)
    assert found is not None
    assert found.policy.raw == SECRET_POLICY
    assert found.label == "enc"


def test_two_encrypted_records_with_same_policy_differ(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    store.create(SECRET_POLICY)
    store.create(SECRET_POLICY)
    entries = tokens_doc(data_dir)["tokens"]
    blobs = [json.dumps({k: v for k, v in e.items() if k not in ("hash", "created_at")}) for e in entries]
    assert blobs[0] != blobs[1]  # random nonce per seal


@pytest.mark.parametrize("written, opened", [
    (RAW_KEY, OTHER_RAW_KEY),
    (PASSPHRASE, "wrong passphrase"),
    (RAW_KEY, PASSPHRASE),
    (PASSPHRASE, RAW_KEY),
], ids=["raw-raw", "pass-pass", "raw-pass", "pass-raw"])
def test_wrong_key_is_a_clear_error_naming_the_env_var(new_store, written, opened):
    new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=written).create(SECRET_POLICY)
    with pytest.raises(RuntimeFailure) as exc:
        new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=opened)
    message = str(exc.value)
    assert "TOKENOMICS_ENCRYPTION_KEY" in message
    assert opened not in message and written not in message  # never echo a secret


def test_wrong_key_message_names_the_configured_env_var(new_store, config):
    cfg = dataclasses.replace(config, security=tokenomics.config.SecurityConfig(encryption_key_env="VAULT_KEY"))
    new_store(cfg, TOKENOMICS_HASH_KEY="k", VAULT_KEY=RAW_KEY).create(SECRET_POLICY)
    with pytest.raises(RuntimeFailure) as exc:
        new_store(cfg, TOKENOMICS_HASH_KEY="k", VAULT_KEY=OTHER_RAW_KEY)
    assert "VAULT_KEY" in str(exc.value)


def test_wrong_key_is_detected_even_when_the_store_holds_no_token(new_store):
    """Otherwise the next token would be sealed with a second key and the store would mix keys."""
    store = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=PASSPHRASE)
    _, record = store.create(SECRET_POLICY)
    store.delete(record.hash[:8])
    with pytest.raises(RuntimeFailure) as exc:
        new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY="another passphrase").create({})
    assert "TOKENOMICS_ENCRYPTION_KEY" in str(exc.value)
    assert new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=PASSPHRASE).records() == []


def test_encrypted_store_without_the_key_is_a_clear_error(new_store):
    new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=PASSPHRASE).create(SECRET_POLICY)
    with pytest.raises(RuntimeFailure) as exc:
        new_store(TOKENOMICS_HASH_KEY="k")
    assert "TOKENOMICS_ENCRYPTION_KEY" in str(exc.value)


def test_plaintext_store_becomes_encrypted_on_the_next_write(new_store, data_dir):
    old_token, _ = new_store(TOKENOMICS_HASH_KEY="k").create({"model": DISTINCT_MODEL})
    assert DISTINCT_MODEL in (data_dir / "tokens.json").read_text()  # written before a key was set

    store = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=PASSPHRASE)
    assert store.lookup(old_token) is not None  # a plaintext store still reads with a key set
    new_token, _ = store.create({"metadata": {"team": DISTINCT_TAG}})
    raw = (data_dir / "tokens.json").read_text()
    assert DISTINCT_MODEL not in raw and DISTINCT_TAG not in raw

    reopened = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=PASSPHRASE)
    assert reopened.lookup(old_token).policy.model == DISTINCT_MODEL
    assert reopened.lookup(new_token).policy.metadata == {"team": DISTINCT_TAG}
    with pytest.raises(RuntimeFailure):
        new_store(TOKENOMICS_HASH_KEY="k")


def test_encrypted_update_and_delete_keep_the_store_encrypted(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    token, record = store.create({"model": "gpt-4o"})
    other, _ = store.create({})
    store.update(record.hash[:12], raw_policy={"model": DISTINCT_MODEL})
    assert DISTINCT_MODEL not in (data_dir / "tokens.json").read_text()
    reopened = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    assert reopened.lookup(token).policy.model == DISTINCT_MODEL
    reopened.delete(record.hash[:12])
    final = new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    assert final.lookup(token) is None and final.lookup(other) is not None


def test_tampered_ciphertext_is_a_clear_error_not_a_crash(new_store, data_dir):
    new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY).create(SECRET_POLICY)
    doc = tokens_doc(data_dir)
    entry = doc["tokens"][0]
    # move the ciphertext to another hash: the token hash is the associated data, so it must not open
    entry["hash"] = "f" * 64
    write_tokens_doc(data_dir, doc)
    with pytest.raises(RuntimeFailure) as exc:
        new_store(TOKENOMICS_HASH_KEY="k", TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    assert "TOKENOMICS_ENCRYPTION_KEY" in str(exc.value)


def test_cli_with_wrong_key_exits_1_naming_the_env_var(cli):
    env = base_env(cli.data_dir, TOKENOMICS_ENCRYPTION_KEY=RAW_KEY)
    cli("token", "create", "--policy", json.dumps(SECRET_POLICY), env=env, check=True)
    for key in (OTHER_RAW_KEY, None):
        proc = cli("token", "list", "--json", env=base_env(cli.data_dir, TOKENOMICS_ENCRYPTION_KEY=key))
        assert proc.returncode == 1, proc.stderr
        assert "TOKENOMICS_ENCRYPTION_KEY" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
        assert OTHER_RAW_KEY not in proc.stderr


# --- concurrent writers -----------------------------------------------------------------------

def test_two_store_instances_interleaving_writes_lose_nothing(new_store):
    a = new_store(TOKENOMICS_HASH_KEY="k")
    b = new_store(TOKENOMICS_HASH_KEY="k")  # both loaded the empty store
    made = []
    for i in range(5):
        made.append(a.create({}, label=f"a{i}")[0])
        made.append(b.create({}, label=f"b{i}")[0])
    fresh = new_store(TOKENOMICS_HASH_KEY="k")
    assert len(fresh.records()) == 10
    assert all(fresh.lookup(t) is not None for t in made)
    # a's stale cache must not resurrect or drop b's records on its next write
    a.delete(fresh.lookup(made[1]).hash)
    fresh = new_store(TOKENOMICS_HASH_KEY="k")
    assert len(fresh.records()) == 9 and fresh.lookup(made[1]) is None


def test_parallel_cli_processes_lose_no_token(cli, new_store):
    cli.token({}, "--label", "warm-up")  # creates the hash key once
    env = cli.env
    procs = [subprocess.Popen([*TOKENOMICS, "token", "create", "--policy",
                               json.dumps({"metadata": {"n": i}}), "--label", f"p{i}", "--json"],
                              cwd=cli.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(20)]
    created = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        created.append(json.loads(out))
    listing = json.loads(cli("token", "list", "--json", check=True).stdout)
    hashes = {item["hash"] for item in listing}
    assert len(listing) == 21
    assert {c["hash"] for c in created} <= hashes
    assert {item["label"] for item in listing} == {"warm-up"} | {f"p{i}" for i in range(20)}
    # every token still authenticates with the key the processes shared
    store = new_store()
    assert all(store.lookup(c["token"]) is not None for c in created)


# --- reload -----------------------------------------------------------------------------------

def test_refresh_picks_up_changes_from_another_instance(new_store):
    server = new_store(TOKENOMICS_HASH_KEY="k")
    cli_side = new_store(TOKENOMICS_HASH_KEY="k")
    now = 1_000_000.0
    server.refresh(now)

    token, record = cli_side.create({"model": "gpt-4o"})
    assert server.lookup(token) is None  # not yet refreshed
    now += tokenomics.store.STORE_RELOAD_INTERVAL
    server.refresh(now)
    assert server.lookup(token) is not None

    cli_side.update(record.hash[:10], raw_policy={"model": "gpt-4.1"})
    now += tokenomics.store.STORE_RELOAD_INTERVAL
    server.refresh(now)
    assert server.lookup(token).policy.model == "gpt-4.1"

    cli_side.delete(record.hash[:10])
    now += tokenomics.store.STORE_RELOAD_INTERVAL
    server.refresh(now)
    assert server.lookup(token) is None


def test_reload_interval_is_within_one_second():
    assert 0 < tokenomics.store.STORE_RELOAD_INTERVAL <= 1.0


def test_refresh_keeps_previous_tokens_when_the_file_is_broken(new_store, data_dir):
    server = new_store(TOKENOMICS_HASH_KEY="k")
    token, _ = server.create({})
    server.refresh(1000.0)
    (data_dir / "tokens.json").write_text("{ this is not json")
    server.refresh(1000.0 + tokenomics.store.STORE_RELOAD_INTERVAL + 1)
    assert server.lookup(token) is not None


# --- find by prefix, update, delete -----------------------------------------------------------

def test_find_by_prefix(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    _, first = store.create({}, label="one")
    _, second = store.create({}, label="two")
    # give both hashes the same 8-char prefix by editing the file, as an ambiguity would look
    doc = tokens_doc(data_dir)
    doc["tokens"][0]["hash"] = "deadbeef0" + first.hash[9:]
    doc["tokens"][1]["hash"] = "deadbeef1" + second.hash[9:]
    write_tokens_doc(data_dir, doc)
    store = new_store(TOKENOMICS_HASH_KEY="k")

    assert store.find("deadbeef0").label == "one"
    assert store.find("DEADBEEF1").label == "two"
    assert store.find("deadbeef0" + first.hash[9:]).label == "one"
    with pytest.raises(UsageError) as exc:
        store.find("deadbee")
    assert "8" in str(exc.value)
    with pytest.raises(RuntimeFailure) as exc:
        store.find("deadbeef")
    assert "ambiguous" in str(exc.value)
    with pytest.raises(RuntimeFailure):
        store.find("0123abcd0123")


def test_update_changes_expiry_label_and_policy(new_store):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    token, record = store.create({"model": "gpt-4o"}, expires_at=time.time() + 3600, label="old")
    prefix = record.hash[:8]

    updated = store.update(prefix, label="new")
    assert updated.label == "new" and updated.expires_at is not None  # expiry kept

    updated = store.update(prefix, expires_at=None)
    assert updated.expires_at is None
    assert new_store(TOKENOMICS_HASH_KEY="k").lookup(token).expires_at is None

    updated = store.update(prefix, raw_policy={"model": "o3"})
    assert updated.policy.model == "o3" and updated.label == "new"

    with pytest.raises(UsageError) as exc:
        store.update(prefix, raw_policy={"model": 5})
    assert "model" in str(exc.value)
    assert new_store(TOKENOMICS_HASH_KEY="k").lookup(token).policy.model == "o3"


def test_update_and_delete_unknown_prefix(new_store):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    store.create({})
    with pytest.raises(RuntimeFailure):
        store.update("zzzzzzzz", label="x")
    with pytest.raises(RuntimeFailure):
        store.delete("zzzzzzzz")
    with pytest.raises(UsageError):
        store.delete("abc")


def test_delete_removes_the_record_from_the_file(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    token, record = store.create({})
    keep, _ = store.create({})
    store.delete(record.hash[:16])
    assert store.lookup(token) is None and store.lookup(keep) is not None
    assert record.hash not in (data_dir / "tokens.json").read_text()


def test_hand_edited_invalid_policy_is_skipped_and_others_load(new_store, data_dir):
    store = new_store(TOKENOMICS_HASH_KEY="k")
    good1, _ = store.create({"model": "gpt-4o"})
    bad, bad_record = store.create({})
    good2, _ = store.create({"max_tokens": 10})
    doc = tokens_doc(data_dir)
    for entry in doc["tokens"]:
        if entry["hash"] == bad_record.hash:
            entry["policy"] = {"max_tokens": "lots", "model_regex": "("}
    write_tokens_doc(data_dir, doc)

    reopened = new_store(TOKENOMICS_HASH_KEY="k")
    assert reopened.lookup(bad) is None
    assert reopened.lookup(good1).policy.model == "gpt-4o"
    assert reopened.lookup(good2).policy.max_tokens == 10
    assert len(reopened.records()) == 2


def test_a_corrupt_store_file_is_a_runtime_failure(new_store, data_dir):
    (data_dir / "tokens.json").write_text("[1, 2")
    with pytest.raises(RuntimeFailure) as exc:
        new_store(TOKENOMICS_HASH_KEY="k")
    assert "tokens.json" in str(exc.value)
