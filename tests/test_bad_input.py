"""Bad input, tried as a new user would: each case stops with one line naming the cause and a
non-zero exit, before any model loads and before any run directory is made. Covers training
prompts outside a model's vocabulary (config.validate), the evaluate CLI (weights files,
prompt files, config, arguments), prompt-file details and checkpoint.every = 0."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflow import evaluate
from fastflow import models as models_mod
from fastflow import train as train_mod
from fastflow.config import ConfigError, DataConfig, load_config, validate
from fastflow.data import load_prompts
from fastflow.shapes.model import ModelConfig, ShapesFlowModel, save_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(channels=(8, 16, 16), text_dim=16, emb_dim=16, text_layers=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(ShapesFlowModel(ModelConfig(**TINY)), path)
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if a model is built: the mistakes must be found before that."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr(models_mod, "build_policy", refuse)


def one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# --------------------------------------------------------------------- training prompts (validate)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_word_outside_the_shapes_vocabulary_fails_validation_naming_file_line_and_word(tmp_path):
    bad = write(tmp_path / "train.txt", "# my prompts\na red circle\na purple hexagon\n")
    for key in ("train_prompts", "eval_prompts"):
        with pytest.raises(ConfigError) as e:
            validate(load_config(None, [f"--data.{key}", str(bad)]))
        msg = str(e.value)
        assert f"data.{key}: {bad}:3:" in msg and "word 'purple' is not in the shapes vocabulary" in msg
        assert "\n" not in msg
    jsonl = write(tmp_path / "train.jsonl", '{"prompt": "a red circle"}\n{"prompt": "a circle on a table"}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl:2: .*word 'on'"):
        validate(load_config(None, ["--data.train_prompts", str(jsonl)]))
    too_long = write(tmp_path / "long.txt", "a red circle and a blue square and a circle\n")
    with pytest.raises(ConfigError, match="long.txt:1: .*10 words; the text encoder reads at most 8"):
        validate(load_config(None, ["--data.train_prompts", str(too_long)]))


def test_the_grammar_is_required_where_the_verifier_or_categories_read_the_prompt(tmp_path):
    odd = write(tmp_path / "odd.txt", "a circle\ncircle a\n")  # known words, outside the grammar
    with pytest.raises(ConfigError, match=r"odd.txt:2: .*'circle a' is not in the grammar"):
        validate(load_config(None, ["--data.train_prompts", str(odd)]))  # the shapes reward judges it
    with pytest.raises(ConfigError, match=r"data.eval_prompts: .*odd.txt:2"):
        validate(load_config(None, ["--data.eval_prompts", str(odd), "--reward.weights", "{clipscore = 1.0}"]))
    # Another reward and uniform sampling never parse a training prompt: the words suffice.
    validate(load_config(None, ["--data.train_prompts", str(odd), "--reward.weights", "{clipscore = 1.0}"]))
    with pytest.raises(ConfigError, match=r"odd.txt:2"):
        validate(load_config(None, ["--data.train_prompts", str(odd), "--reward.weights", "{clipscore = 1.0}",
                                    "--sample.prompt_sampling", "category"]))


def test_toy_prompts_need_a_colour_word_and_other_models_take_any_text(tmp_path):
    bad = write(tmp_path / "p.txt", "a red square\na purple square\n")
    with pytest.raises(ConfigError, match=r"p.txt:2: toy model: no colour word in prompt 'a purple square'"):
        validate(load_config(None, ["--model.kind", "toy", "--reward.weights", "{toy_color = 1.0}",
                                    "--data.train_prompts", str(bad)]))
    validate(load_config(None, ["--model.kind", "sd3", "--reward.weights", "{clipscore = 1.0}",
                                "--data.train_prompts", str(bad), "--data.eval_prompts", str(bad)]))


def test_train_cli_stops_in_validation_before_any_run_directory(tmp_path, capsys):
    bad = write(tmp_path / "train.txt", "a purple hexagon\n")
    out = tmp_path / "runs"
    rc = train_mod.main(["--data.train_prompts", str(bad), "--run.output_dir", str(out)])
    line = one_line(capsys, "fastflow: config: data.train_prompts:")
    assert rc == 2 and f"{bad}:1:" in line and "'purple'" in line
    assert not out.exists()


def test_prompt_files_comments_bom_encoding_and_home(tmp_path, monkeypatch):
    f = write(tmp_path / "p.txt", b"\xef\xbb\xbfa circle\r\n# a comment\r\n   # indented comment\n\n"
                                  b"a square # not a comment\n")
    assert [p.text for p in load_prompts(f)] == ["a circle", "a square # not a comment"]
    # the comment rule is documented where users look: the loader and the data.train_prompts help
    assert "#" in load_prompts.__doc__
    assert "#" in {fl.name: fl for fl in DataConfig.__dataclass_fields__.values()}["train_prompts"].metadata["help"]
    bad = write(tmp_path / "latin1.txt", "a circle\nun carr\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9\)"):
        load_prompts(bad)
    with pytest.raises(ConfigError, match=r"data.eval_prompts: .*latin1.txt:2: not UTF-8"):
        validate(load_config(None, ["--data.eval_prompts", str(bad)]))
    with pytest.raises(ValueError, match=r'p.jsonl:1: the "prompt" is empty'):
        load_prompts(write(tmp_path / "p.jsonl", '{"prompt": "  "}\n'))
    write(tmp_path / "home.txt", "a circle\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded by the check as by the loader
    validate(load_config(None, ["--data.eval_prompts", "~/home.txt"]))


def test_checkpoint_every_zero_checkpoints_only_at_the_end(tmp_path):
    from test_train import run, toy_cfg

    with pytest.raises(ConfigError, match="checkpoint.every"):
        validate(load_config(None, ["--checkpoint.every", "-1"]))
    cfg, d = toy_cfg(tmp_path, "--checkpoint.every", "0", "--checkpoint.keep", "10", "--run.iterations", "3")
    t = run(cfg, d)
    assert sorted(p.name for p in (t.run_dir / "checkpoints").iterdir()) == ["iter-000003"]


# ------------------------------------------------------------------------------- evaluate CLI


def truncated_copy(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


@pytest.mark.parametrize("case", ["truncated_data", "truncated_header", "pickle", "pickle_named_safetensors",
                                  "torch_save", "not_shapes"])
def test_evaluate_refuses_bad_weights_files_before_loading(case, tiny_weights, tmp_path, capsys, no_model_loads):
    size = tiny_weights.stat().st_size
    if case == "truncated_data":
        ck, cause = truncated_copy(tiny_weights, tmp_path / "w.safetensors", size - 100), "is truncated"
    elif case == "truncated_header":
        ck, cause = truncated_copy(tiny_weights, tmp_path / "w.safetensors", 50), "not a complete .safetensors"
    elif case == "pickle":
        ck, cause = tmp_path / "w.pkl", "is a pickle file"
        ck.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    elif case == "pickle_named_safetensors":
        ck, cause = tmp_path / "w.safetensors", "is a pickle file, not a .safetensors file"
        ck.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    elif case == "torch_save":
        ck, cause = tmp_path / "w.pt", "is a zip archive (torch.save)"
        torch.save({"w": torch.zeros(2)}, ck)
    else:
        from safetensors.torch import save_file
        ck, cause = tmp_path / "w.safetensors", "is not a fastflow shapes model"
        save_file({"w": torch.zeros(2)}, str(ck))
    rc = evaluate.main(["--checkpoint", str(ck), "--out", str(tmp_path / "ev")])
    line = one_line(capsys, "evaluate: --checkpoint ")
    assert rc == 2 and str(ck) in line and cause in line
    assert not (tmp_path / "ev").exists()


def test_evaluate_refuses_bad_checkpoint_folders(tiny_weights, tmp_path, capsys, no_model_loads):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    ck = tmp_path / "iter-000001"
    ck.mkdir()
    truncated_copy(tiny_weights, ck / "trainable.safetensors", 100)
    for path, cause in [(tmp_path / "missing", "--checkpoint not found"),
                        (tmp_path / "run", "no complete checkpoint under"),
                        (tmp_path / "empty", "is neither a model file"),
                        (ck, "trainable.safetensors is not a complete .safetensors file")]:
        assert evaluate.main(["--checkpoint", str(path), "--out", str(tmp_path / "ev")]) == 2
        assert cause in one_line(capsys, "evaluate: --checkpoint")
    assert evaluate.main(["--baseline", str(tmp_path / "empty"), "--out", str(tmp_path / "ev")]) == 2
    assert "is neither" in one_line(capsys, "evaluate: --baseline")


def test_evaluate_refuses_bad_prompts_config_and_arguments(tmp_path, capsys, no_model_loads):
    purple = write(tmp_path / "purple.txt", "a red circle\na purple hexagon\n")
    odd = write(tmp_path / "odd.txt", "a circle\ncircle a\n")
    latin = write(tmp_path / "latin.txt", b"a circle\n\xff\xfe\n")
    bad_toml = write(tmp_path / "bad.toml", '[model]\ndtype = "fp16"\n')
    out = ["--out", str(tmp_path / "ev")]
    cases = [
        (["--prompts", str(purple)], f"evaluate: --prompts: {purple}:2: shapes prompt 'a purple hexagon': word 'purple'"),
        (["--prompts", str(odd)], f"evaluate: --prompts: {odd}:2: shapes prompt 'circle a' is not in the grammar"),
        (["--prompts", str(latin)], f"evaluate: --prompts: {latin}:2: not UTF-8 text (byte 0xff)"),
        (["--prompts", str(tmp_path / "none.txt")], "evaluate: --prompts: prompt file not found"),
        ([str(tmp_path / "missing.toml")], f"evaluate: config: file not found: {tmp_path / 'missing.toml'}"),
        ([str(bad_toml)], "evaluate: config: model.dtype must be one of float32, bfloat16, float16"),
        (["--seeds", "0"], "evaluate: --seeds must be >= 1, got 0"),
        (["--seeds", "-3"], "evaluate: --seeds must be >= 1, got -3"),
        (["--steps", "-1"], "evaluate: --steps must be >= 1, got -1"),
        (["--steps", "0"], "evaluate: --steps must be >= 1, got 0"),
        (["--batch", "0"], "evaluate: --batch must be >= 1, got 0"),
        (["--min-category-images", "-2"], "evaluate: --min-category-images must be >= 0, got -2"),
        (["--guidance", "-1"], "evaluate: --guidance must be a finite number >= 0"),
        (["--guidance", "nan"], "evaluate: --guidance must be a finite number >= 0"),
        (["--guidance", "inf"], "evaluate: --guidance must be a finite number >= 0"),
        (["--seeds", "two"], "evaluate: argument --seeds: invalid int value: 'two'"),
        (["--device", "gpu0"], "evaluate: --device 'gpu0' is not a device"),
        (["--out", str(purple)], f"evaluate: --out {purple} exists and is not a directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "evaluate: --device cuda: CUDA is not available here"))
    for argv, start in cases:
        assert evaluate.main(argv + out if "--out" not in argv else argv) == 2, argv
        assert one_line(capsys, start), argv
    assert evaluate.main([]) == 2
    assert "required: --out" in one_line(capsys, "evaluate: ")
    assert not (tmp_path / "ev").exists()


def test_evaluate_reports_a_checkpoint_of_another_lora_rank_in_one_line(tiny_weights, tmp_path, capsys):
    """Only loading can tell this one; it is still one line, not a traceback."""
    from safetensors.torch import save_file

    from fastflow.shapes.policy import build_policy

    cfg = load_config(None, ["--model.path", str(tiny_weights), "--model.lora_rank", "4"])
    pol = build_policy(cfg, "cpu")
    ck = tmp_path / "iter-000001"
    ck.mkdir()
    save_file({n: p.detach().contiguous() for n, p in pol.named_trainable_parameters().items()},
              str(ck / "trainable.safetensors"))
    config = write(tmp_path / "c.toml", f'[model]\npath = "{tiny_weights}"\nlora_rank = 8\n')
    assert evaluate.main([str(config), "--checkpoint", str(ck), "--out", str(tmp_path / "ev")]) == 2
    line = one_line(capsys, "evaluate: --checkpoint: ")
    assert "in the checkpoint but" in line and "model.lora_rank" in line


def test_evaluate_cli_in_a_subprocess_prints_one_line_for_a_truncated_file(tiny_weights, tmp_path):
    ck = truncated_copy(tiny_weights, tmp_path / "w.safetensors", tiny_weights.stat().st_size // 2)
    r = subprocess.run([sys.executable, "-m", "fastflow.evaluate", "--checkpoint", str(ck), "--out",
                        str(tmp_path / "ev")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"evaluate: --checkpoint {ck} is truncated: it holds ")
