"""Bad input, round two: each bad external input is one paragraph naming the file or key and the fix, exit 2, and
nothing already written is touched; random single-field config changes raise ConfigError, never a traceback."""

import json
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.cli import main
from benchmarks.config import ConfigError, config_from_dict, load_suite, to_yaml


def _run(capsys, tmp_path, *sets):
    """``prefbench run --suite smoke`` with its cache and run folders under tmp_path; (exit code, stderr)."""
    code = main(["run", "--suite", "smoke", "--set", f"cache_dir={tmp_path / 'cache'}", "--set",
                 f"runs_dir={tmp_path / 'runs'}", *[x for s in sets for x in ("--set", s)]])
    return code, capsys.readouterr().err


def _model_folder(tmp_path, tiny_lm):
    model, tok = tiny_lm
    d = tmp_path / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _prefs(tmp_path, rows):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_a_preference_file_with_no_rows(capsys, tmp_path):
    p = _prefs(tmp_path, [])
    code, err = _run(capsys, tmp_path, f"prefs.source={p}")
    assert code == 2 and "'prefs.source'" in err and "has no rows" in err and str(p) in err
    assert not (tmp_path / "cache" / "data").exists()  # refused before any stage


def test_a_preference_row_of_10_mb(capsys, tmp_path):
    p = _prefs(tmp_path, [{"prompt": "a", "chosen": "good", "rejected": "bad"},
                          {"prompt": "b", "chosen": "x" * 10_000_000, "rejected": "bad"}])
    code, err = _run(capsys, tmp_path, f"prefs.source={p}")
    assert code == 2 and "row 1 field 'chosen' has 10,000,000 characters" in err and "Drop or cut that row" in err


@pytest.mark.parametrize("damage", ["missing", "truncated", "bad_header"])
def test_a_base_model_folder_with_missing_or_damaged_weights(capsys, tmp_path, tiny_lm, damage):
    d = _model_folder(tmp_path, tiny_lm)
    w = d / "model.safetensors"
    if damage == "missing":
        w.unlink()
    elif damage == "truncated":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
    else:
        w.write_bytes(b"\xff" * 64)
    code, err = _run(capsys, tmp_path, f"base.model={d}")
    assert code == 2 and "'base.model'" in err, err
    want = {"missing": "holds no weights", "truncated": "truncated: its tensors need", "bad_header": "is damaged"}[damage]
    assert want in err and ("Copy" in err or "copy" in err)


def test_a_corrupt_tokenizer_file(capsys, tmp_path, tiny_lm):
    d = _model_folder(tmp_path, tiny_lm)
    t = d / "tokenizer.json"
    t.write_text(t.read_text()[:100])
    code, err = _run(capsys, tmp_path, f"base.model={d}")
    assert code == 2 and "tokenizer file" in err and str(t) in err and "JSONDecodeError" in err


def test_a_suite_path_that_is_a_folder(capsys, tmp_path):
    assert main(["run", "--suite", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder; give a suite YAML file" in err and "smoke" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a folder's permission bits")
def test_a_read_only_cache_folder_permission(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = main(["run", "--suite", "smoke", "--set", f"cache_dir={ro}"])
    finally:
        ro.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err
    assert code == 2 and "'cache_dir'" in err and "cannot write" in err


def test_a_cache_folder_on_a_read_only_filesystem(capsys, tmp_path, monkeypatch):
    """EROFS as a read-only mount gives it (root ignores permission bits, so the error is injected at mkstemp)."""
    import errno
    import tempfile

    real = tempfile.mkstemp
    ro = tmp_path / "mnt"

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and str(dir).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    keep = tmp_path / "runs" / "smoke" / "summary.csv"
    keep.parent.mkdir(parents=True)
    keep.write_text("earlier run\n")
    code = main(["run", "--suite", "smoke", "--set", f"cache_dir={ro}", "--set", f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'cache_dir'" in err and "Read-only file system" in err and "--set cache_dir=" in err
    assert keep.read_text() == "earlier run\n"  # nothing written is lost


# ------------------------------------------------------------------------ random single-field config changes
def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k)


_SMOKE = json.loads(json.dumps(__import__("yaml").safe_load(to_yaml(load_suite("smoke")))))
_KEYS = sorted(_leaves(_SMOKE))
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=4)), max_size=3),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_KEYS), value=_VALUES)
def test_random_single_field_changes_raise_only_config_errors(key, value):
    data = json.loads(json.dumps(_SMOKE))
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    try:
        config_from_dict(data)
    except ConfigError as e:
        assert "config" in str(e) or "." in str(e)  # a message, naming something
