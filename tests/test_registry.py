"""Model registry: names, manifests, register/list/show/rm, path resolution, the `models` verb."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import safetensors.torch

from minilab import cli, registry
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import format_params, sha256_file
from minilab.model import ModelConfig, build_model

TINY = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=16)


def make_model_dir(path: Path) -> Path:
    """A minimal HF-style directory: config.json + model.safetensors (tied head stored once)."""
    path.mkdir(parents=True)
    model = build_model(TINY)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("x" * 1000)
    return path


def true_size(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", stdin)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.mark.parametrize("name", ["llama-23M-tinystories-pretrain-v1", "llama-1.8M-tiny_stories-sft-v12",
                                  "llama3.2-1.1B-fineweb_edu-lora-v2", "mistral-500-x-int8-v3"])
def test_good_names(name):
    assert registry.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "  ", "../x", "a/b", "/abs/llama-23M-x-sft-v1", "llama-23M-a..b-sft-v1",
                                  "llama-23M-tinystories-pretrain", "Llama-23M-ts-sft-v1",
                                  "llama-23m-ts-sft-v1", "llama-23M-tiny-stories-sft-v1",
                                  "llama-23M-ts-train-v1", "llama-23M-ts-sft-v0", "llama-23M-ts-sft-1",
                                  "llama-23M-ts-sft-v1\\x", "_x-23M-ts-sft-v1"])
def test_bad_names(name):
    with pytest.raises(ConfigError) as e:
        registry.validate_name(name)
    assert "\n" not in str(e.value)


def test_parse_and_make_name(root):
    assert registry.parse_name("llama-23M-tinystories-pretrain-v4") == {
        "architecture": "llama", "size": "23M", "dataset": "tinystories", "training_type": "pretrain",
        "version": 4, "base": "llama-23M-tinystories-pretrain"}
    assert registry.make_name("LLaMA", 1_812_352, "Tiny-Stories", "sft", root=root) == \
        "llama-1.8M-tiny_stories-sft-v1"
    with pytest.raises(ConfigError):
        registry.make_name("llama", 100, "a/b", "sft", root=root)
    with pytest.raises(ConfigError):
        registry.make_name("llama", 100, "ts", "bogus", root=root)


def test_register_link_list_show_and_next_version(tmp_path, root):
    src = make_model_dir(tmp_path / "run" / "final")
    params = registry.count_params(src)
    assert params == build_model(TINY).num_params()
    path = registry.register(src, root=root, dataset="tinystories", training_type="pretrain",
                             metrics={"val_loss": 3.2}, tokenizer_sha256="cd" * 32)
    name = f"llama-{format_params(params)}-tinystories-pretrain-v1"
    assert path == src
    manifest = registry.read_manifest(src)
    assert manifest["name"] == name and manifest["params"] == params and manifest["lineage"] == []
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(src / "model.safetensors")
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/notes.txt"}
    assert registry.verify_manifest(src) == []

    assert registry.make_name("llama", params, "tinystories", "pretrain", root=root).endswith("-v2")
    with pytest.raises(MinilabError, match="already exists"):
        registry.register(make_model_dir(tmp_path / "other"), name, root=root)
    with pytest.raises(MinilabError, match="already registered"):
        registry.register(src, name.replace("-v1", "-v2"), root=root)

    (rows,) = registry.list_models(root)
    assert rows["name"] == name and rows["type"] == "pretrain" and rows["params"] == params
    assert rows["size_bytes"] == true_size(src) and rows["linked"] and not rows["missing"]

    info = registry.show_model(name, root)
    assert info["size_bytes"] == true_size(src)
    assert {f["path"]: f["size"] for f in info["files"]}["sub/notes.txt"] == 1000
    (src / "sub" / "notes.txt").write_text("tampered")
    assert registry.verify_manifest(src) == ["changed: sub/notes.txt"]


def test_copy_mode_and_lineage(tmp_path, root):
    base = registry.register(make_model_dir(tmp_path / "base"), "llama-5K-ts-pretrain-v1", root=root)
    src = make_model_dir(tmp_path / "sft_out")
    copy = registry.register(src, "llama-5K-ts-sft-v1", root=root, link=False, parent="llama-5K-ts-pretrain-v1")
    assert copy == root / "llama-5K-ts-sft-v1" and copy.is_dir()
    assert not (src / "manifest.json").exists()  # the source is not touched when copying
    m = registry.read_manifest(copy)
    parent_fp = registry.read_manifest(base)["fingerprint"]
    assert m["parent"] == "llama-5K-ts-pretrain-v1" and m["parent_fingerprint"] == parent_fp
    assert m["lineage"] == [{"name": "llama-5K-ts-pretrain-v1", "fingerprint": parent_fp,
                             "training_type": "pretrain"}]
    index = json.loads((root / "registry.json").read_text())["models"]
    assert index["llama-5K-ts-sft-v1"]["path"] == "llama-5K-ts-sft-v1"  # root-relative: movable
    assert [r["name"] for r in registry.list_models(root)] == ["llama-5K-ts-pretrain-v1", "llama-5K-ts-sft-v1"]


def test_register_rejects_non_model_dirs(tmp_path, root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinilabError, match="not a model directory"):
        registry.register(tmp_path / "empty", "llama-5K-ts-sft-v1", root=root)
    with pytest.raises(MinilabError, match="does not exist"):
        registry.register(tmp_path / "nope", "llama-5K-ts-sft-v1", root=root)
    with pytest.raises(MinilabError, match="dataset, training_type"):
        registry.register(make_model_dir(tmp_path / "m"), root=root)


def test_resolve_model_dir(tmp_path, root):
    src = make_model_dir(tmp_path / "final")
    registry.register(src, "llama-5K-ts-pretrain-v1", root=root)
    assert registry.resolve_model_dir("llama-5K-ts-pretrain-v1", root) == src.resolve()
    assert registry.resolve_model_dir(str(src), root) == src
    assert registry.resolve_model_dir(src) == src
    with pytest.raises(MinilabError, match="did you mean llama-5K-ts-pretrain-v1") as e:
        registry.resolve_model_dir("llama-5K-ts-pretrain-v2", root)
    assert "\n" not in str(e.value)
    with pytest.raises(MinilabError, match="unknown model"):
        registry.resolve_model_dir("../nowhere", root)


def test_env_var_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILAB_MODELS_DIR", str(tmp_path / "envroot"))
    registry.register(make_model_dir(tmp_path / "m"), "llama-5K-ts-ft-v1")
    assert (tmp_path / "envroot" / "registry.json").is_file()
    assert registry.resolve_model_dir("llama-5K-ts-ft-v1") == (tmp_path / "m").resolve()


def test_cli_list_show_rm(tmp_path, root, capsys, monkeypatch):
    linked = make_model_dir(tmp_path / "run" / "final")
    registry.register(linked, "llama-5K-ts-pretrain-v1", root=root)
    registry.register(make_model_dir(tmp_path / "x"), "llama-5K-ts-sft-v1", root=root, link=False)

    code, out, _ = run_cli(["models", "list", "--models-dir", str(root)], capsys)
    assert code == 0 and "llama-5K-ts-pretrain-v1" in out and "KiB" in out and "size" in out
    code, out, _ = run_cli(["models", "--models_dir", str(root), "list", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0 and rows[1]["size_bytes"] == true_size(root / "llama-5K-ts-sft-v1")

    code, out, _ = run_cli(["models", "show", "llama-5K-ts-sft-v1", "--models-dir", str(root), "--json"], capsys)
    assert code == 0 and json.loads(out)["manifest"]["name"] == "llama-5K-ts-sft-v1"
    code, out, _ = run_cli(["models", "show", "llama-5K-ts-sft-v1", "--models-dir", str(root), "--verify"],
                           capsys)
    assert code == 0 and "model.safetensors" in out and "verify      ok" in out

    # No TTY, no --yes: refuse, one line, no traceback, nothing removed.
    code, _, err = run_cli(["models", "rm", "llama-5K-ts-sft-v1", "--models-dir", str(root)], capsys,
                           stdin=io.StringIO(""), monkeypatch=monkeypatch)
    assert code != 0 and "--yes" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (root / "llama-5K-ts-sft-v1").is_dir()

    # A registry-owned copy is deleted; a linked run directory is kept.
    code, out, _ = run_cli(["models", "rm", "llama-5K-ts-sft-v1", "--models-dir", str(root), "--yes"], capsys)
    assert code == 0 and not (root / "llama-5K-ts-sft-v1").exists()
    code, out, _ = run_cli(["models", "rm", "llama-5K-ts-pretrain-v1", "--models-dir", str(root), "-y"], capsys)
    assert code == 0 and linked.is_dir() and "kept" in out
    assert registry.list_models(root) == []
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == ["registry.json"]

    code, _, err = run_cli(["models", "rm", "llama-5K-ts-pretrain-v1", "--models-dir", str(root), "--yes"],
                           capsys)
    assert code == 1 and "unknown model" in err and len(err.strip().splitlines()) == 1


def test_rm_confirmation_on_tty(tmp_path, root, capsys, monkeypatch):
    registry.register(make_model_dir(tmp_path / "m"), "llama-5K-ts-dpo-v1", root=root)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    code, out, _ = run_cli(["models", "rm", "llama-5K-ts-dpo-v1", "--models-dir", str(root)], capsys,
                           stdin=Tty("n\n"), monkeypatch=monkeypatch)
    assert code == 1 and "not removed" in out and len(registry.list_models(root)) == 1
    code, out, _ = run_cli(["models", "rm", "llama-5K-ts-dpo-v1", "--models-dir", str(root),
                            "--delete-files"], capsys, stdin=Tty("y\n"), monkeypatch=monkeypatch)
    assert code == 0 and registry.list_models(root) == [] and not (tmp_path / "m").exists()


def test_register_hf_export(tmp_path, root):
    hf = pytest.importorskip("minilab.hf")
    model = build_model(TINY)
    out = hf.save_hf_dir(model, tmp_path / "export")
    path = registry.register(out, root=root, dataset="tinystories", training_type="pretrain")
    (row,) = registry.list_models(root)
    assert row["params"] == model.num_params() and row["size_bytes"] == true_size(path)
    assert row["name"] == f"llama-{format_params(model.num_params())}-tinystories-pretrain-v1"


def test_show_refuses_a_huge_name_and_a_folder_that_is_not_a_model(tmp_path, root, capsys, monkeypatch):
    """A 5,000-character name is an unknown model (not 'File name too long'), shown shortened; a
    folder without a model manifest (`..`, a corpus) is not shown as if it were a model."""
    linked = make_model_dir(tmp_path / "run" / "final")
    registry.register(linked, "llama-5K-ts-pretrain-v1", root=root)
    code, _, err = run_cli(["models", "show", "a" * 5000, "--models-dir", str(root)], capsys)
    assert code == 1 and "unknown model 'aaaa" in err and "(5,000 characters)" in err
    assert len(err) < 300 and "Traceback" not in err
    monkeypatch.chdir(tmp_path / "run")
    for folder in ("..", str(tmp_path / "run")):
        code, out, err = run_cli(["models", "show", folder, "--models-dir", str(root)], capsys)
        assert code == 1 and out == "" and err.count("\n") == 1
        assert f"{folder}: a directory but not a minilab model" in err
    # a model directory given by path and a registered name still show
    code, out, _ = run_cli(["models", "show", "final", "--models-dir", str(root)], capsys)
    assert code == 0 and "model.safetensors" in out
    code, out, _ = run_cli(["models", "show", "llama-5K-ts-pretrain-v1", "--models-dir", str(root)], capsys)
    assert code == 0 and "model.safetensors" in out
    with pytest.raises(MinilabError, match="unknown model"):
        registry.resolve_model_dir("b" * 5000, root)


def test_rm_refuses_a_model_others_name_as_parent_or_base(tmp_path, root, capsys):
    """`models rm BASE` removed the base of a registered LoRA, which then could not load."""
    base = registry.register(make_model_dir(tmp_path / "base"), "llama-5K-ts-pretrain-v1", root=root, link=False)
    registry.register(make_model_dir(tmp_path / "lora"), "llama-5K-ts-lora-v1", root=root,
                      parent="llama-5K-ts-pretrain-v1")
    registry.register(make_model_dir(tmp_path / "sft"), "llama-5K-ts-sft-v1", root=root,
                      base_model={"name": str(base), "path": str(base.resolve())})
    code, _, err = run_cli(["models", "rm", "llama-5K-ts-pretrain-v1", "--models-dir", str(root), "--yes"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "parent or base of llama-5K-ts-lora-v1, llama-5K-ts-sft-v1" in err
    assert base.is_dir() and "llama-5K-ts-pretrain-v1" in {r["name"] for r in registry.list_models(root)}
    with pytest.raises(MinilabError, match="parent or base"):
        registry.remove_model("llama-5K-ts-pretrain-v1", root)
    for name in ("llama-5K-ts-lora-v1", "llama-5K-ts-sft-v1", "llama-5K-ts-pretrain-v1"):
        assert run_cli(["models", "rm", name, "--models-dir", str(root), "--yes"], capsys)[0] == 0
    assert not base.exists()


def test_rm_and_show_refuse_what_is_not_a_registered_model(tmp_path, root, capsys):
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "a.txt").write_text("mine")
    for argv in (["rm", str(plain), "--yes"], ["rm", "..", "--yes"], ["rm", "z" * 5000, "--yes"],
                 ["show", str(plain)], ["show", ".."], ["show", "z" * 5000]):
        code, _, err = run_cli(["models", *argv, "--models-dir", str(root)], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert len(err) < 400
    assert (plain / "a.txt").read_text() == "mine"


@pytest.mark.parametrize("index", ["[1, 2]", '{"models": ', '"text"'])
def test_a_damaged_registry_index_is_an_error_and_is_never_rewritten(tmp_path, root, index):
    """A registry.json that is not a JSON object was read as an AttributeError traceback (a list) or
    could be taken for empty; registering into it would have replaced the user's index."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "registry.json").write_text(index, encoding="utf-8")
    src = make_model_dir(tmp_path / "m")
    with pytest.raises(MinilabError, match="registry.json: .*(invalid JSON|expected a JSON object)"):
        registry.list_models(root)
    with pytest.raises(MinilabError, match="registry.json"):
        registry.register(src, "llama-5K-ts-pretrain-v1", root=root)
    assert (root / "registry.json").read_text(encoding="utf-8") == index
