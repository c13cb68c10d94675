"""Typed config loading and the CLI's error contract: one line, the key named, exit 2."""

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from minilab.cli import main
from minilab.config import SEED, check_device, describe, load_config, to_dict
from minilab.errors import ConfigError


@dataclass
class Train:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    steps: int = 100
    precision: str = "fp32"

    def validate(self):
        if self.lr <= 0:
            raise ConfigError("must be positive", key="lr")


@dataclass
class Run:
    name: str
    train: Train = field(default_factory=Train)
    data_dirs: list[str] = field(default_factory=list)
    seed: int | None = None


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_json_load_with_overrides(tmp_path):
    y = write(tmp_path, "run.yaml", "name: a\ntrain:\n  lr: 1e-3\ndata_dirs: [x, y]\n")
    cfg = load_config(Run, y, ["train.steps=7", "seed=3"])
    assert (cfg.name, cfg.train.lr, cfg.train.steps, cfg.data_dirs, cfg.seed) == ("a", 1e-3, 7, ["x", "y"], 3)
    j = write(tmp_path, "run.json", json.dumps(to_dict(cfg)))
    assert load_config(Run, j) == cfg


@pytest.mark.parametrize("text,override,expect", [
    ("name: a\ntrain:\n  lrr: 1\n", None, "key 'train.lrr': unknown key (did you mean 'lr'?)"),
    ("name: a\ntrain:\n  steps: ten\n", None, "key 'train.steps': expected an integer, got 'ten'"),
    ("name: a\n", "train.lr=-1", "key 'train.lr': must be positive"),
    ("train: {}\n", None, "key 'name': required key is missing"),
    ("name: a\ndata_dirs: x\n", None, "key 'data_dirs': expected a list"),
    ("name: [unclosed\n", None, "invalid YAML"),
])
def test_config_errors_name_file_and_key(tmp_path, text, override, expect):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(Run, p, [override] if override else None)
    assert str(p) in str(e.value)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_describe_lists_nested_keys_with_help():
    rows = {k: (d, h) for k, d, h in describe(Run)}
    assert rows["train.lr"] == ("0.0003", "peak learning rate")
    assert rows["name"][0] == "(required)"


@dataclass
class Tuned:
    train: Train = field(default_factory=lambda: Train(lr=2e-5, precision="bf16"))
    plain: Train = field(default_factory=Train)


def test_describe_shows_a_nested_field_s_own_default_not_its_class_defaults():
    """Was: `train.lr` showed Train's class default 0.0003 although Tuned() runs with 2e-05."""
    rows = {k: d for k, d, _ in describe(Tuned)}
    assert rows == {"train.lr": "2e-05", "train.steps": "100", "train.precision": "'bf16'",
                    "plain.lr": "0.0003", "plain.steps": "100", "plain.precision": "'fp32'"}
    from minilab.finetune.sft import SFTConfig

    sft = {k: d for k, d, _ in describe(SFTConfig)}
    assert sft["optim.lr"] == repr(SFTConfig().optim.lr) == "0.0002"


def test_cli_help_lists_verbs_and_every_verb_has_help(capsys):
    from minilab.cli import VERBS

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert {"demo", "arch", "models", "corpus", "tokenizer", "pack", "pretrain", "eval"} <= set(VERBS)
    for verb in VERBS:
        assert verb in out
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0, verb
        assert f"usage: minilab {verb}" in capsys.readouterr().out


def test_cli_typo_is_one_line_exit_2():
    # Through a real process: what the user sees is stderr and the exit code.
    proc = subprocess.run([sys.executable, "-m", "minilab", "arch", "micro", "--set", "n_layerr=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_layerr" in lines[0] and "did you mean 'n_layer'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_arch_prints_true_counts(capsys):
    assert main(["arch", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["params"] == sum(rows["tiny"]["params_by_group"].values())
    assert rows["micro"]["size"].endswith("M")


def verb_config_classes() -> list[type]:
    """Every dataclass a verb or a recipe stage is configured with, nested ones included (a
    section such as `optim`, or the items of `sources: list[SourceConfig]`): the recipe's stage
    kinds (each the config of its verb), `arch`'s ModelConfig, and every class a docs table shows."""
    import dataclasses
    import typing
    from pathlib import Path

    from minilab import docs_tables, stage
    from minilab.model import ModelConfig

    repo = Path(__file__).resolve().parents[1]
    roots = [stage.get(kind).config for kind in stage.kinds()] + [ModelConfig]
    for page in docs_tables.markdown_files([repo / "README.md", repo / "docs"]):
        for m in docs_tables.REGION.finditer(page.read_text(encoding="utf-8")):
            if m["kind"] == "config-table":
                roots.append(docs_tables.resolve_class(m["ref"]))
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):  # SourceConfig in list[SourceConfig], X in X | None
                if dataclasses.is_dataclass(t):
                    walk(t)

    for cls in roots:
        walk(cls)
    return seen


def test_every_verb_config_field_has_help():
    """`minilab VERB --config`/`--set` keys are documented from the fields' help (the tables in
    docs/stages/*.md, `describe`): a field without one shows an empty "what it does" cell."""
    import dataclasses

    classes = verb_config_classes()
    names = {c.__name__ for c in classes}
    assert {"PretrainConfig", "SFTConfig", "DPOConfig", "OptimConfig", "LoraSettings", "ModelConfig",
            "CorpusConfig", "SourceConfig", "QualityConfig", "DedupConfig", "MergeStageConfig"} <= names
    missing = [f"{c.__module__}:{c.__qualname__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if not str(f.metadata.get("help", "")).strip()]
    assert not missing, "config fields without metadata={'help': ...}: " + ", ".join(missing)
    # what the docs tables print: every dotted key, nested sections flattened
    empty = [f"{c.__name__}: {key}" for c in classes for key, _, text in describe(c) if not text.strip()]
    assert not empty, "keys shown without help: " + ", ".join(empty)


@dataclass
class Bounded:
    workers: int = field(default=0, metadata={"help": "w", "min": 0})
    fraction: float = field(default=0.1, metadata={"help": "f", "gt": 0, "lt": 1})
    seed: int = field(default=1, metadata={"help": "s", **SEED})
    device: str = field(default="auto", metadata={"help": "d", "check": check_device})
    inner: Train = field(default_factory=Train)


@pytest.mark.parametrize("override,expect", [
    ("workers=-1", "key 'workers': must be ≥ 0, got -1"),
    ("fraction=0", "key 'fraction': must be in (0, 1), got 0.0"),
    ("fraction=1", "key 'fraction': must be in (0, 1), got 1.0"),
    ("fraction=.nan", "key 'fraction': must be a finite number, got nan"),
    ("seed=-1", "key 'seed': must be in [0, 4294967295], got -1"),
    (f"seed={2**64}", f"key 'seed': must be in [0, 4294967295], got {2**64}"),
    (f"seed={2**32}", f"key 'seed': must be in [0, 4294967295], got {2**32}"),
    ("device=tpu", "key 'device': unknown device 'tpu': use auto, cpu, cuda, cuda:N (a GPU index) or mps"),
])
def test_field_metadata_bounds_are_checked_on_load(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(Bounded, None, [override])
    assert str(e.value) == f"--set: {expect}"


@pytest.mark.parametrize("override", ["workers=0", "fraction=0.5", f"seed={2**32 - 1}", "seed=0",
                                      "device=cuda:1", "device=cpu", "device=mps", "device=auto"])
def test_field_metadata_bounds_accept_the_edges(override):
    load_config(Bounded, None, [override])


@pytest.mark.parametrize("argv,expect", [
    (["pretrain", "--data-dirs", "d", "--tokenizer-dir", "t", "--output-dir", "o", "--set", "device=tpu"],
     "key 'device': unknown device 'tpu'"),
    (["sft", "--set", "device=gpu"], "key 'device': unknown device 'gpu'"),
    (["pack", "--seed", "-1"], "key 'seed': must be in [0, 4294967295], got -1"),
    (["pack", "--seed", str(2**64)], "key 'seed': must be in [0, 4294967295]"),
    (["pretrain", "--set", f"seed={2**64}"], "key 'seed': must be in [0, 4294967295]"),
    (["pretrain", "--set", f"seed={2**32}"], "key 'seed': must be in [0, 4294967295]"),  # np.random.seed's limit
    (["corpus", "--source", "x", "--set", "seed=-5"], "key 'seed': must be in [0, "),
    (["pack", "--workers", "-1"], "key 'workers': must be ≥ 0, got -1"),
    (["pack", "--val-fraction", "0"], "key 'val_fraction': must be in (0, 1), got 0.0"),
    (["corpus", "--source", "x", "--output-dir", "o", "--set", "dedup.num_perm=0"],
     "key 'dedup.num_perm': must be ≥ 8, got 0"),
    (["corpus", "--source", "x", "--output-dir", "o", "--set", "dedup.seed=-1"],
     "key 'dedup.seed': must be in [0, 4294967295], got -1"),
    (["tokenizer", "--sample-chars", "-1"], "key 'sample_chars': must be ≥ 0, got -1"),
    (["pretrain", "--set", "eval_batches=0"], "key 'eval_batches': must be ≥ 1, got 0"),  # was ZeroDivisionError
    (["pretrain", "--set", "seq_len=0"], "key 'seq_len': must be ≥ 1, got 0"),  # was silently the packed one
    (["sft", "--set", "eval_batches=0"], "key 'eval_batches': must be ≥ 1, got 0"),
    # nan passed `lr <= 0` (a traceback from AdamW); inf trained to loss nan and registered the model
    (["pretrain", "--set", "optim.lr=nan"], "key 'optim.lr': must be a finite number, got nan"),
    (["pretrain", "--set", "optim.lr=inf"], "key 'optim.lr': must be a finite number, got inf"),
    (["pretrain", "--set", "optim.lr=.inf"], "key 'optim.lr': must be a finite number, got inf"),
    (["sft", "--set", "optim.weight_decay=-inf"], "key 'optim.weight_decay': must be a finite number, got -inf"),
    (["pretrain", "--set", "data_weights=[1, nan]"], "key 'data_weights[1]': must be a finite number, got nan"),
    (["dpo", "--set", "beta=NaN"], "key 'beta': must be a finite number, got nan"),
])
def test_cli_refuses_out_of_range_values_in_one_line(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                                     b"name: a\x00\x00\x01\x02"])
def test_a_binary_config_file_is_one_line_naming_the_file(tmp_path, capsys, content):
    p = tmp_path / "weights.bin"
    p.write_bytes(content)
    assert main(["pack", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{p}: not a text file" in err and "UnicodeDecodeError" not in err


@pytest.mark.parametrize("name,text,expect", [
    ("bad.yaml", "name: a\ntrain:\n  lr: [1,\n", "bad.yaml: line 4: invalid YAML"),
    ("bad.json", '{"name": "a",\n "x": }\n', "bad.json: line 2: invalid JSON"),
])
def test_config_syntax_errors_name_file_and_line(tmp_path, name, text, expect):
    p = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as e:
        load_config(Run, p)
    assert expect in str(e.value)


def test_os_error_on_a_named_path_is_one_line(tmp_path, capsys):
    """`--output-dir` under an ordinary file (or in /proc, on a read-only disk): the path and the
    OS reason, exit 1, no traceback; the stage's hidden temporary folder is shown as the output."""
    from minilab.cli import os_error_line

    (tmp_path / "afile").write_text("x")
    corpus = tmp_path / "c"
    corpus.mkdir()
    assert main(["tokenizer", "--corpus-dir", str(corpus), "--output-dir", str(tmp_path / "afile" / "tok"),
                 "--vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert err == f"minilab: error: {tmp_path / 'afile'}: exists and is not a directory\n"
    e = FileNotFoundError(2, "No such file or directory", "/proc/.zz.onz7dlal.tmp")
    assert os_error_line(e) == "/proc/zz: No such file or directory"
    e = PermissionError(13, "Permission denied", "/data/out")
    assert os_error_line(e) == "/data/out: Permission denied"


def test_os_error_without_a_file_keeps_its_traceback(monkeypatch):
    import minilab.arch

    def boom(args):
        raise OSError("a programming error, not a path")

    monkeypatch.setattr(minilab.arch, "main", boom)
    with pytest.raises(OSError):
        main(["arch"])
