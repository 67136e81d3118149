"""Signed audit records: a correct signature verifies; an edited (and re-chained) record, a signature
by another key, or a forged signature fails; unsigned records keep working."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from obliviate.cli.main import app
from obliviate.reporting import signing
from obliviate.reporting.audit import chain
from test_registry import make_unlearn_run

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


@pytest.fixture
def signed(tmp_path):
    """A run certified with a new key: (record path, public key path, the run)."""
    assert run("keygen", "--out", tmp_path / "keys").exit_code == 0
    unlearn = make_unlearn_run(tmp_path)
    res = run("certify", unlearn, "--sign-key", tmp_path / "keys" / "audit.key",
              "--out", tmp_path / "record.json")
    assert res.exit_code == 0, res.output
    return tmp_path / "record.json", tmp_path / "keys" / "audit.pub", unlearn


def _rewrite(path, record):
    path.write_text(json.dumps(record))


def test_signed_record_verifies_with_its_key(signed):
    record, public, _ = signed
    assert "signature" in json.loads(record.read_text())
    res = run("verify", record, "--public-key", public)
    assert res.exit_code == 0, res.output
    assert "signed by the given key" in res.output
    assert "give --public-key" in run("verify", record).output  # signed, checked only when asked


def test_edited_and_rechained_record_fails(signed):
    record_path, public, _ = signed
    record = json.loads(record_path.read_text())
    bodies = [{k: v for k, v in e.items() if k not in ("seq", "prev", "hash")} for e in record["entries"]]
    model = next(b for b in bodies if b["type"] == "file" and b.get("sha256"))
    model["sha256"] = "f" * 64  # a forger swaps in another model's fingerprint and re-hashes the whole chain
    forged = {**chain(bodies), "signature": record["signature"]}
    _rewrite(record_path, forged)
    assert run("verify", record_path, "--no-rehash").exit_code == 0  # the chain alone is consistent again
    res = run("verify", record_path, "--no-rehash", "--public-key", public)
    assert res.exit_code == 1 and "signature does not match" in res.output


def test_signature_by_another_key_or_forged_bytes_fails(signed, tmp_path):
    record_path, public, _ = signed
    original = json.loads(record_path.read_text())
    other = signing.Ed25519PrivateKey.generate()
    _rewrite(record_path, signing.sign({k: v for k, v in original.items() if k != "signature"}, other))
    res = run("verify", record_path, "--no-rehash", "--public-key", public)
    assert res.exit_code == 1 and "another key" in res.output and "does not match" in res.output
    bad = dict(original["signature"])
    raw = bytearray(base64.b64decode(bad["value"]))
    raw[0] ^= 1
    bad["value"] = base64.b64encode(bytes(raw)).decode()
    _rewrite(record_path, {**original, "signature": bad})
    res = run("verify", record_path, "--no-rehash", "--public-key", public)
    assert res.exit_code == 1 and "does not match" in res.output
    _rewrite(record_path, {**original, "signature": {"algorithm": "rsa"}})
    res = run("verify", record_path, "--no-rehash", "--public-key", public)
    assert res.exit_code == 1 and "malformed" in res.output


def test_unsigned_records_keep_working_and_a_key_requires_a_signature(tmp_path):
    unlearn = make_unlearn_run(tmp_path)
    assert run("certify", unlearn, "--out", tmp_path / "r.json").exit_code == 0
    assert run("verify", tmp_path / "r.json", "--no-rehash").exit_code == 0
    assert run("keygen", "--out", tmp_path / "k").exit_code == 0
    res = run("verify", tmp_path / "r.json", "--no-rehash", "--public-key", tmp_path / "k" / "audit.pub")
    assert res.exit_code == 1 and "not signed" in res.output


def test_bad_keys_are_one_line_errors(tmp_path):
    unlearn = make_unlearn_run(tmp_path)
    (tmp_path / "bad.key").write_text("not a key")
    res = run("certify", unlearn, "--sign-key", tmp_path / "bad.key", "--out", tmp_path / "r.json")
    assert res.exit_code == 2 and "bad.key" in res.output and not (tmp_path / "r.json").exists()
    assert run("keygen", "--out", tmp_path / "k").exit_code == 0
    res = run("keygen", "--out", tmp_path / "k")
    assert res.exit_code == 2 and "refusing to replace" in res.output
    assert (tmp_path / "k" / "audit.key").stat().st_mode & 0o777 == 0o600
