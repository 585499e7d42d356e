"""Conversation memory logs end to end: what the model was sent and answered, masked, rotated."""
import gzip
import json
import time

from test_proxy import an, oa


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_memory_log_records_masked_turns_and_rotates(cli, stub, start_proxy, data_dir):
    token = cli.token({"rules": [{"type": "pii", "detect": ["email"], "action": "mask"}],
                       "memory": {"enabled": True, "file_path": "mem", "file_name": "{token_hash}/{date}.md",
                                  "max_size_mb": 0.0005, "compress_old": True}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    for i in range(4):
        client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": f"question {i} from eve@example.com"}])
    stub.set_stream_chunks(["streamed ", "answer"])
    list(client.chat.completions.create(model="gpt-4o", stream=True,
                                        messages=[{"role": "user", "content": "stream please"}]))
    an(proxy, token).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                     messages=[{"role": "user", "content": "anthropic turn"}])
    assert proxy.stop() == 0
    root = data_dir / "mem"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("stream please" in p.read_text(errors="ignore")
                                                  for p in _files(root) if p.suffix == ".md"):
        time.sleep(0.05)
    files = _files(root)
    assert files, "no memory file written"
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    text = "".join(gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
                   for p in files)
    assert any(p.suffix == ".gz" for p in files), "no rotated, compressed file"
    assert "eve@example.com" not in text and "[REDACTED:EMAIL]" in text
    assert "| user | gpt-4o" in text and "| assistant | gpt-4o" in text
    assert "streamed answer" in text and "anthropic turn" in text
    assert token not in text
    prefix = files[0].relative_to(root).parts[0]
    assert len(prefix) == 16 and all(c in "0123456789abcdef" for c in prefix)


def test_memory_redis_list_backend(cli, stub, start_proxy, redis_server):
    import redis
    token = cli.token({"rules": [{"type": "pii", "detect": ["email"], "action": "mask"}],
                       "memory": {"enabled": True, "redis": True}})
    proxy = start_proxy(upstream_url=stub.url, config={"session": {"redis": {"addr": f"127.0.0.1:{redis_server}"}}})
    oa(proxy, token).chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": "mail zoe@example.com please"}])
    client = redis.Redis(port=redis_server)
    deadline = time.monotonic() + 5
    keys = []
    while time.monotonic() < deadline and not keys:
        keys = client.keys("tokenomics:memory:*")
        time.sleep(0.02)
    assert len(keys) == 1
    session_id = keys[0].decode().rsplit(":", 1)[1]
    assert len(session_id) == 8
    entries = [e.decode() for e in client.lrange(keys[0], 0, -1)]
    assert len(entries) == 2
    assert "| user | gpt-4o" in entries[0] and "[REDACTED:EMAIL]" in entries[0]
    assert "zoe@example.com" not in "".join(entries) and token not in "".join(entries)
    assert "| assistant | gpt-4o" in entries[1]
    assert proxy.stop() == 0
    sessions = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    assert sessions[-1]["session_id"] == session_id  # the list is named after the ledger session


def test_memory_redis_unreachable_never_fails_requests(cli, stub, start_proxy):
    from conftest import free_port
    token = cli.token({"memory": {"redis": True}})
    proxy = start_proxy(upstream_url=stub.url, config={"session": {"redis": {"addr": f"127.0.0.1:{free_port()}"}}})
    for _ in range(2):
        out = oa(proxy, token).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert out.choices[0].message.content
    proxy.stop()
    assert proxy.stderr.count("cannot write to Redis") == 1
