"""The `coralfs` command line: in-process via cli.main (capsys) plus a few real subprocess runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from coralfs import __version__, cli  # noqa: E402
from coralfs.errors import NotARepository, UnknownRevision  # noqa: E402


# ------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("CORALFS_REPO", raising=False)
    monkeypatch.delenv("CORALFS_DEBUG", raising=False)
    monkeypatch.setenv("CORALFS_AUTHOR", "tester <t@example.org>")


@pytest.fixture
def run(capsys):
    """run(*argv) -> (exit code, stdout, stderr)."""

    def _run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        o, e = capsys.readouterr()
        return rc, o, e

    return _run


def ok(result: tuple[int, str, str]) -> str:
    rc, o, e = result
    assert rc == 0, f"rc={rc} stderr={e!r}"
    assert e == ""  # stderr is not a terminal here: no progress line, no chatter
    return o


def fail(result: tuple[int, str, str], code: int, *needles: str) -> str:
    rc, o, e = result
    assert rc == code, f"rc={rc} (wanted {code}) stdout={o!r} stderr={e!r}"
    lines = e.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coralfs: error: "), e
    for n in needles:
        assert n in e, (n, e)
    return e


def sha(path_or_bytes) -> str:
    if isinstance(path_or_bytes, bytes):
        return hashlib.sha256(path_or_bytes).hexdigest()
    with open(path_or_bytes, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_model(path, seed: int, hidden: int = 32) -> str:
    """A small real torch.save checkpoint; returns its sha256."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    torch.save(model.state_dict(), path)
    return sha(path)


def finetune(src, dst, seed: int) -> str:
    """A 'fine-tuned' version of src: same tensors, slightly perturbed."""
    sd = torch.load(src, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    torch.save(sd, dst)
    return sha(dst)


def cat_stdout(monkeypatch, spec: str) -> bytes:
    """`coralfs cat SPEC` in-process with a real binary stdout; returns the bytes written."""
    raw = io.BytesIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8"))
        assert cli.main(["cat", spec]) == 0
        sys.stdout.flush()
        return raw.getvalue()


@pytest.fixture
def repo_dir(tmp_path, monkeypatch, run):
    d = tmp_path / "my_model_repo"
    ok(run("init", d))
    monkeypatch.chdir(d)
    return d


# ------------------------------------------------------------------ the quick start
def test_quickstart(tmp_path, monkeypatch, run):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    v1 = save_model(ckpt / "model_checkpoint.pth", 0)

    out = ok(run("init", tmp_path / "my_model_repo"))
    assert "Initialized empty coralfs repository" in out
    repo = tmp_path / "my_model_repo"
    monkeypatch.chdir(repo)
    assert "No commits yet" in ok(run("status"))

    (repo / "model_checkpoint.pth").write_bytes((ckpt / "model_checkpoint.pth").read_bytes())
    ok(run("add", "model_checkpoint.pth"))
    st = json.loads(ok(run("status", "--json")))
    assert st["staged"] == {"model_checkpoint.pth": "added"} and st["branch"] == "main"
    out = ok(run("commit", "-m", "Initial fine-tuned model", "--metric", "accuracy=0.925",
                 "--meta", "dataset=imagenet-mini", "--meta", "lr=3e-4"))
    assert out.startswith("[main ") and "Initial fine-tuned model" in out and "accuracy=0.925" in out
    assert "nothing to commit, working tree clean" in ok(run("status"))

    ok(run("branch", "experiment/lr-0.001"))
    out = ok(run("checkout", "experiment/lr-0.001"))
    assert "Switched to branch 'experiment/lr-0.001'" in out
    v10 = finetune(repo / "model_checkpoint.pth", repo / "model_checkpoint_epoch_10.pth", 10)
    v2 = finetune(repo / "model_checkpoint.pth", repo / "model_checkpoint.pth", 11)
    st = json.loads(ok(run("status", "--json")))
    assert st["modified"] == ["model_checkpoint.pth"] and st["untracked"] == ["model_checkpoint_epoch_10.pth"]
    text = ok(run("status"))
    assert "Changes not staged for commit:" in text and "Untracked files:" in text
    ok(run("add", "model_checkpoint_epoch_10.pth", "model_checkpoint.pth"))
    text = ok(run("status"))
    assert "Changes to be committed:" in text and "modified:" in text and "added:" in text
    ok(run("commit", "-m", "LR 0.001, acc 94.2", "--metric", "accuracy=0.942"))

    # log: text, -n, --oneline, --json
    text = ok(run("log"))
    assert text.count("commit ") == 2 and "LR 0.001, acc 94.2" in text and "Initial fine-tuned model" in text
    assert "accuracy=0.925" in text and "accuracy=0.942" in text and "dataset=imagenet-mini" in text
    assert "Date:" in text and "HEAD -> experiment/lr-0.001" in text
    lines = ok(run("log", "--oneline")).splitlines()
    assert len(lines) == 2 and "LR 0.001" in lines[0] and "main" in lines[1]
    assert len(ok(run("log", "-n", "1", "--oneline")).splitlines()) == 1
    log = json.loads(ok(run("log", "--json")))
    assert [c["message"] for c in log] == ["LR 0.001, acc 94.2", "Initial fine-tuned model"]
    assert log[1]["metrics"] == {"accuracy": 0.925} and log[1]["meta"] == {"dataset": "imagenet-mini",
                                                                            "lr": "3e-4"}
    assert log[0]["parents"] == [log[1]["id"]] and log[0]["author"] == "tester <t@example.org>"
    assert json.loads(ok(run("log", "main", "--json")))[0]["id"] == log[1]["id"]

    # tag the main model as production; list tags
    out = ok(run("tag", "v1.0-prod", "--metric", "accuracy=0.945", "-m", "Q4 production model", "main"))
    assert "v1.0-prod" in out
    text = ok(run("tag", "-l"))
    assert "v1.0-prod" in text and "accuracy=0.945" in text and "Q4 production model" in text
    tags = json.loads(ok(run("tag", "-l", "--json")))
    assert tags[0]["name"] == "v1.0-prod" and tags[0]["commit"] == log[1]["id"]
    assert tags[0]["metrics"] == {"accuracy": 0.945} and tags[0]["message"] == "Q4 production model"
    assert "tag: v1.0-prod" in ok(run("log", "--oneline"))

    # revision syntax
    head_id = log[0]["id"]
    for rev in ("HEAD", head_id[:8], "experiment/lr-0.001"):
        assert json.loads(ok(run("show", rev, "--json")))["id"] == head_id
    for rev in ("HEAD~1", "HEAD^", "HEAD~", "main", "v1.0-prod", log[1]["id"][:10]):
        assert json.loads(ok(run("show", rev, "--json")))["id"] == log[1]["id"]

    # ls / show / cat
    text = ok(run("ls", "main"))
    assert "model_checkpoint.pth" in text and "epoch_10" not in text
    listing = json.loads(ok(run("ls", "HEAD", "--json")))
    assert [e["path"] for e in listing] == ["model_checkpoint.pth", "model_checkpoint_epoch_10.pth"]
    assert listing[0]["size"] == os.path.getsize(repo / "model_checkpoint.pth")
    assert all(len(e["manifest"]) == 64 and e["format"] for e in listing)
    long = ok(run("ls", "-l", "HEAD", "model_checkpoint_epoch_10.pth"))
    assert len(long.splitlines()) == 1 and listing[1]["manifest"][:12] in long
    text = ok(run("show", "HEAD"))
    for needle in (head_id, log[1]["id"], "tester <t@example.org>", "LR 0.001, acc 94.2", "accuracy=0.942",
                   "model_checkpoint.pth", "model_checkpoint_epoch_10.pth", "Date:"):
        assert needle in text, needle
    assert "M " in text and "A " in text
    shown = json.loads(ok(run("show", "v1.0-prod", "--json")))
    assert shown["tag"]["metrics"] == {"accuracy": 0.945} and shown["files"][0]["path"] == "model_checkpoint.pth"
    assert "Q4 production model" in ok(run("show", "v1.0-prod"))

    assert sha(cat_stdout(monkeypatch, "main:model_checkpoint.pth")) == v1
    assert sha(cat_stdout(monkeypatch, "model_checkpoint_epoch_10.pth")) == v10  # bare path: HEAD
    ok(run("cat", "HEAD~1:model_checkpoint.pth", "-o", tmp_path / "out.pth"))
    assert sha(tmp_path / "out.pth") == v1
    assert torch.load(tmp_path / "out.pth", weights_only=True).keys() == {"0.weight", "0.bias", "2.weight",
                                                                           "2.bias"}

    # rollback to the production tag: byte for byte, and the newer file disappears
    out = ok(run("checkout", "v1.0-prod"))
    assert "detached" in out
    assert sha(repo / "model_checkpoint.pth") == v1
    assert not (repo / "model_checkpoint_epoch_10.pth").exists()
    assert json.loads(ok(run("status", "--json")))["branch"] is None
    assert "HEAD detached at" in ok(run("status"))
    ok(run("checkout", "experiment/lr-0.001"))
    assert sha(repo / "model_checkpoint.pth") == v2 and sha(repo / "model_checkpoint_epoch_10.pth") == v10
    ok(run("checkout", "main"))
    assert sha(repo / "model_checkpoint.pth") == v1

    # branch listing
    text = ok(run("branch"))
    assert "* main" in text and "  experiment/lr-0.001" in text
    br = json.loads(ok(run("branch", "--json")))
    assert {b["name"]: b["current"] for b in br} == {"main": True, "experiment/lr-0.001": False}

    # stats
    text = ok(run("stats"))
    for needle in ("logical size", "stored size", "ratio", "chunks", "dedup hits", "codec", "iB"):
        assert needle in text, needle
    s = json.loads(ok(run("stats", "--json")))
    assert s["file_versions"] == 3 and s["logical_bytes"] > 0 and s["stored_bytes"] > 0 and s["by_codec"]


def test_version(run):
    rc, out, _ = run("--version")
    assert rc == 0 and out.strip() == f"coralfs {__version__}"


# ------------------------------------------------------------------ other commands
def test_rm_branch_tag_delete(repo_dir, run):
    (repo_dir / "a.bin").write_bytes(b"a" * 5000)
    (repo_dir / "sub").mkdir()
    (repo_dir / "sub" / "b.bin").write_bytes(b"b" * 3000)
    ok(run("add", "."))
    ok(run("commit", "-m", "two files"))
    out = ok(run("rm", "--cached", "a.bin"))
    assert "a.bin" in out and (repo_dir / "a.bin").exists()
    st = json.loads(ok(run("status", "--json")))
    assert st["staged"] == {"a.bin": "deleted"} and st["untracked"] == ["a.bin"]
    ok(run("rm", "sub"))
    assert not (repo_dir / "sub" / "b.bin").exists()
    ok(run("commit", "-m", "rm"))
    assert json.loads(ok(run("ls", "--json"))) == []
    shown = json.loads(ok(run("show", "--json")))
    assert shown["deleted"] == ["a.bin", "sub/b.bin"]
    assert "D " in ok(run("show"))
    assert [e["path"] for e in json.loads(ok(run("ls", "HEAD~1", "sub", "--json")))] == ["sub/b.bin"]
    assert [e["path"] for e in json.loads(ok(run("ls", "HEAD~1:sub/", "--json")))] == ["sub/b.bin"]
    fail(run("ls", "HEAD~1", "nope"), 3, "nope")

    ok(run("branch", "old", "HEAD~1"))
    assert json.loads(ok(run("show", "old", "--json")))["message"] == "two files"
    fail(run("branch", "old"), 4, "already exists")
    ok(run("branch", "-f", "old", "HEAD"))
    fail(run("branch", "-d", "main"), 2, "checked-out")
    assert "Deleted branch old" in ok(run("branch", "-d", "old"))
    fail(run("branch", "-d", "old"), 3, "no such branch")
    ok(run("tag", "t1"))
    fail(run("tag", "t1"), 4, "already exists")
    ok(run("tag", "-d", "t1"))
    assert json.loads(ok(run("tag", "--json"))) == []
    fail(run("tag", "-d", "t1"), 3, "no such tag")
    ok(run("checkout", "-b", "feature", "HEAD~1"))
    assert (repo_dir / "a.bin").read_bytes() == b"a" * 5000
    assert json.loads(ok(run("status", "--json")))["branch"] == "feature"


def test_quiet_and_progress_on_terminal(repo_dir, run, monkeypatch):
    (repo_dir / "w.bin").write_bytes(os.urandom(300_000))

    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["-q", "add", "w.bin"]) == 0
    assert tty.getvalue() == ""
    (repo_dir / "w.bin").write_bytes(os.urandom(300_000))
    assert cli.main(["add", "w.bin"]) == 0
    shown = tty.getvalue()
    assert "adding w.bin" in shown and "100%" in shown and shown.endswith("\r\x1b[K")


def test_quiet_flag_silences_info(repo_dir, run):
    (repo_dir / "x.bin").write_bytes(b"x" * 100)
    assert ok(run("add", "-q", "x.bin")) == ""
    assert ok(run("commit", "-q", "-m", "x")) == ""
    assert ok(run("-q", "tag", "v")) == ""


# ------------------------------------------------------------------ errors
def test_errors(repo_dir, tmp_path, run, monkeypatch):
    fail(run("log"), 3, "no commits yet")
    fail(run("commit", "-m", "empty"), 5, "nothing to commit")
    (repo_dir / "m.bin").write_bytes(b"1" * 2000)
    fail(run("commit", "-m", "empty"), 5, "nothing to commit", "coralfs add")
    ok(run("add", "m.bin"))
    fail(run("commit", "-m", "x", "--metric", "accuracy=high"), 2, "'high' is not a number")
    fail(run("commit", "-m", "x", "--metric", "accuracy"), 2, "KEY=VALUE")
    fail(run("commit", "-m", "x", "--metric", "loss=nan"), 2, "finite")
    fail(run("commit", "-m", "x", "--meta", "=v"), 2, "KEY=VALUE")
    ok(run("commit", "-m", "first"))
    fail(run("show", "nosuchrev"), 3, "unknown revision: nosuchrev")
    fail(run("cat", "nosuchrev:m.bin"), 3, "unknown revision")
    fail(run("cat", "HEAD:nope.bin"), 3, "nope.bin")
    fail(run("show", "HEAD~5"), 3, "history is not that long")
    fail(run("checkout", "nosuchrev"), 3, "unknown revision")
    for bad in ("..", "a/../b", "@foo", "x/@y", "bad\x00name", "has space"):
        fail(run("branch", bad), 2, "invalid branch name")
    fail(run("tag", "@v1"), 2, "invalid tag name")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"o")
    fail(run("add", outside), 3, "outside the repository")
    fail(run("add", "nonexistent.bin"), 3, "no such file")
    fail(run("add", ".coralfs/store/data.mdb"), 2, "reserved")

    # checkout that would overwrite uncommitted changes
    ok(run("branch", "other"))
    ok(run("checkout", "other"))
    (repo_dir / "m.bin").write_bytes(b"2" * 2000)
    ok(run("add", "m.bin"))
    ok(run("commit", "-m", "second"))
    (repo_dir / "m.bin").write_bytes(b"3" * 2000)
    fail(run("checkout", "main"), 6, "uncommitted changes", "m.bin", "--force")
    assert (repo_dir / "m.bin").read_bytes() == b"3" * 2000
    ok(run("checkout", "--force", "main"))
    assert (repo_dir / "m.bin").read_bytes() == b"1" * 2000

    # usage errors (argparse): exit 2
    rc, _, err = run("commit")
    assert rc == 2 and "required" in err and "usage:" in err
    rc, _, err = run("frobnicate")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run()
    assert rc == 2 and "usage:" in err

    # not a repository
    monkeypatch.chdir(tmp_path)
    fail(run("status"), 2, "not a coralfs repository")
    fail(run("-R", tmp_path, "log"), 2, "not a coralfs repository")
    fail(run("init", repo_dir), 2, "already exists")


def test_unexpected_error_is_one_line(repo_dir, run, monkeypatch, capsys):
    from coralfs.repository import Repository

    def boom(self):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(Repository, "status", boom)
    fail(run("status"), 1, "unexpected RuntimeError: kaboom")
    monkeypatch.setenv("CORALFS_DEBUG", "1")
    rc, _, err = run("status")
    assert rc == 1 and "Traceback" in err and err.strip().endswith("coralfs: error: unexpected RuntimeError: kaboom")


def test_error_classes_map_to_exit_codes(repo_dir, run, monkeypatch):
    from coralfs.repository import Repository

    for exc in (NotARepository("nope"), UnknownRevision("who?")):
        def raiser(self, exc=exc):
            raise exc

        monkeypatch.setattr(Repository, "stats", raiser)
        fail(run("stats"), exc.exit_code, str(exc))


# ------------------------------------------------------------------ -R and CORALFS_REPO
def test_repo_option_and_env(repo_dir, tmp_path, run, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo_dir / "in_repo.bin").write_bytes(b"r" * 4000)
    (repo_dir / "sub").mkdir()
    monkeypatch.chdir(repo_dir / "sub")  # discovery from a subdirectory, path relative to cwd
    ok(run("add", "../in_repo.bin"))
    monkeypatch.chdir(elsewhere)
    ok(run("-R", repo_dir, "commit", "-m", "via -R"))
    assert json.loads(ok(run("log", "--json", "-R", repo_dir)))[0]["message"] == "via -R"  # after the command
    (repo_dir / "second.bin").write_bytes(b"s" * 100)
    ok(run("-R", repo_dir, "add", "second.bin"))  # relative to the repository root when cwd is outside
    monkeypatch.setenv("CORALFS_REPO", str(repo_dir))
    ok(run("commit", "-m", "via env"))
    assert [c["message"] for c in json.loads(ok(run("log", "--json")))] == ["via env", "via -R"]
    assert [e["path"] for e in json.loads(ok(run("ls", "--json")))] == ["in_repo.bin", "second.bin"]
    other = tmp_path / "other"
    ok(run("init", other))
    assert json.loads(ok(run("-R", other, "status", "--json")))["head"] is None  # -R beats the env


# ------------------------------------------------------------------ real processes
def _coralfs(*argv, cwd, input=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORALFS_")}
    env["CORALFS_AUTHOR"] = "sub <s@example.org>"
    return subprocess.run([sys.executable, "-m", "coralfs", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, input=input, timeout=60)


def test_subprocess_console_script(tmp_path):
    repo = tmp_path / "r"
    p = _coralfs("init", repo, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ckpt = repo / "model.pth"
    digest = save_model(ckpt, 3, hidden=64)
    weird = bytes(range(256)) * 64 + b"\r\n\n\r\x00\x1a"  # bytes a text-mode stdout would mangle
    (repo / "weird.bin").write_bytes(weird)
    p = _coralfs("add", "model.pth", "weird.bin", cwd=repo)
    assert p.returncode == 0 and p.stderr == b"", p.stderr  # piped: no progress line
    p = _coralfs("commit", "-m", "one", "--metric", "accuracy=0.9", cwd=repo)
    assert p.returncode == 0 and p.stderr == b"", p.stderr

    p = _coralfs("-R", repo, "cat", "HEAD:model.pth", cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == b"" and sha(p.stdout) == digest
    p = _coralfs("cat", "weird.bin", cwd=repo)
    assert p.returncode == 0 and p.stdout == weird

    p = _coralfs("cat", "HEAD:missing.pth", cwd=repo)
    assert p.returncode == 3 and p.stdout == b""
    assert p.stderr.decode().splitlines() == [p.stderr.decode().strip()]
    assert p.stderr.startswith(b"coralfs: error: ")
    p = _coralfs("log", cwd=tmp_path)
    assert p.returncode == 2 and b"not a coralfs repository" in p.stderr and b"Traceback" not in p.stderr
    p = _coralfs("--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.decode().strip() == f"coralfs {__version__}"


def test_log_best_metric(tmp_path, capsys):
    import json as _json

    from coralfs.cli import main as cli_main

    repo = tmp_path / "r"
    assert cli_main(["init", str(repo)]) == 0
    for i, acc in enumerate([0.5, 0.9, 0.7]):
        (repo / "f.txt").write_text(str(i))
        assert cli_main(["-R", str(repo), "add", str(repo / "f.txt")]) == 0
        assert cli_main(["-R", str(repo), "commit", "-m", f"c{i}", "--metric", f"accuracy={acc}"]) == 0
    capsys.readouterr()
    assert cli_main(["-R", str(repo), "log", "--json", "--metric", "accuracy", "--best", "max"]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["message"] == "c1"
    assert cli_main(["-R", str(repo), "log", "--json", "--metric", "accuracy", "--best", "min"]) == 0
    assert _json.loads(capsys.readouterr().out)[0]["message"] == "c0"
    assert cli_main(["-R", str(repo), "log", "--metric", "nope", "--best", "max"]) == 3
