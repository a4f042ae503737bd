"""The command-line edge (latentup.cli): free text as typed, unknown keys, --help, where outputs go, offline words."""

import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import REPO, SHARED
from latentup.cli import prepare_arguments, quote
from latentup.errors import ConfigError, WeightsNotFoundError

# Stable Diffusion prompts are comma-separated lists (RUNWARE.md's task examples leave them as "..."; these are the
# kind its positivePrompt / negativePrompt carry).
PROMPTS = ["restore detail, preserve framing", "blurry, lowres, jpeg artifacts, watermark",
           "a 'quoted' word, [brackets], {braces}, 50% = more; key=value\\path"]


def script(name: str, *args: str, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("text", [*PROMPTS, "a\\${x}", "${oc.env:HOME}", "end\\", "x\\'y", "'", "null ", ""])
def test_quote_reads_back_verbatim(text):
    with initialize_config_dir(str(REPO / "configs" / "infer"), version_base=None):
        assert compose("infer", [f"prompt={quote(text)}"]).prompt == text


def test_comma_prompts_and_paths_through_the_real_cli(tmp_path):
    """As typed in a shell: prompt="a, b" (the shell drops the quotes) reaches the config verbatim."""
    done = script("infer.py", f"prompt={PROMPTS[0]}", f"negative_prompt={PROMPTS[1]}", f"output={tmp_path}/a,b.png",
                  "input=in ${x}, 2.png", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert (cfg["prompt"], cfg["negative_prompt"]) == (PROMPTS[0], PROMPTS[1])
    assert cfg["output"] == f"{tmp_path}/a,b.png" and cfg["input"] == "in \\${x}, 2.png"  # escaped: no interpolation


def test_already_quoted_values_are_kept():
    args = prepare_arguments(["prompt='a, b'", 'negative_prompt="c, d"', "steps=4"], REPO / "configs" / "infer",
                             "infer", "", ("prompt", "negative_prompt"))
    assert args == ["prompt='a, b'", 'negative_prompt="c, d"', "steps=4"]


@pytest.mark.parametrize(("name", "config", "args", "message"), [
    ("infer", "infer/infer", ["stepz=4"], "unknown key 'stepz' for infer: did you mean steps?"),
    ("infer", "infer/infer", ["+stepz=4"], "unknown key 'stepz' for infer: did you mean steps?"),
    ("infer", "infer/infer", ["negative_promt=x"], "did you mean negative_prompt?"),
    ("evaluate", "evaluate", ["+trainer.max_steps=4"], "unknown key 'trainer.max_steps' for evaluate"),
    ("evaluate", "evaluate", ["autoencoder=taesdd"], "unknown autoencoder 'taesdd': did you mean taesd?"),
    ("train", "train", ["stepz=4"], "unknown key 'stepz' for train: did you mean model.validation.steps?"),
    ("train", "train", ["+stepz=4"], "unknown key 'stepz' for train"),
    ("train", "train", ["trainer.max_step=4"], "did you mean trainer.max_steps"),
    ("train", "train", ["experiment=quickstartt"], "unknown experiment 'quickstartt': did you mean quickstart?"),
    ("train", "train", ["+trainer.profilr=simple"], "cannot add trainer.profilr: lightning.pytorch.Trainer takes no keyword 'profilr' (did you mean trainer.profiler"),
    ("train", "train", ["steps=1,2"], "several values are a sweep"),
    ("train", "train", ["photo.png"], "argument 'photo.png' is not key=value"),
])
def test_unknown_keys_are_refused_with_the_nearest(name, config, args, message):
    folder, _, config_name = f"configs/{config}".rpartition("/")
    with pytest.raises(ConfigError) as error:
        prepare_arguments(args, REPO / folder, config_name, "", (), script=name)
    assert message in str(error.value)


def test_plus_reaches_objects_only():
    """``+`` adds a keyword a ``_target_`` takes, or an entry of a collection of targets; ``+`` on a known key or
    group is a plain change."""
    args = ["experiment=quickstart", "+trainer.profiler=simple", "+callbacks.kill._target_=x.Y", "+seed=3",
            "+trainer=cpu"]  # a second trainer entry would silently undo the experiment's trainer settings
    assert prepare_arguments(args, REPO / "configs", "train", "", ()) == [*args[:3], "seed=3", "trainer=cpu"]


@pytest.mark.parametrize("args", [["stepz=4"], ["+stepz=4"]])
def test_unknown_key_cli_is_one_line_exit_2(args):
    done = script("infer.py", "input=x.png", *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: unknown key 'stepz' for infer.py: did you mean steps?")


@pytest.mark.parametrize(("name", "keys", "absent"), [
    ("infer.py", ["input=null", "prompt=\"\"", "steps=null", "overwrite=false", "max_pixels=4194304"], ["trainer"]),
    ("train.py", ["experiment=null", "threads=null", "ckpt_path=null", "quickstart"], []),
    ("evaluate.py", ["checkpoints=[]", "sets=[Set5, Set14, B100]", "autoencoder=taesd"], ["trainer", "model=", "optim"]),
])
def test_help_has_usage_keys_meanings_and_examples(name, keys, absent):
    done = script(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python {name} [key=value ...]")
    assert "examples:" in done.stdout and f"python {name} " in done.stdout.split("examples:")[1]
    lines = done.stdout.splitlines()
    for key in keys:
        line = next(line for line in lines if key in line)
        assert len(line.split(maxsplit=1)) == 2 or key == "quickstart", line  # a meaning beside the key
    assert not any(word in done.stdout for word in absent)
    assert len(lines) < 80


def test_output_goes_to_the_current_folder(tmp_path):
    """The default output is ``<name>_x2`` in the current folder, not beside the input (an installed package)."""
    (tmp_path / "inputs").mkdir()
    (tmp_path / "work").mkdir()
    Image.open(SHARED / "datasets/eval/Set5/baby.png").convert("RGB").resize((40, 32)).save(tmp_path / "inputs/p.png")
    done = script("infer.py", f"input={tmp_path / 'inputs/p.png'}", "steps=1", "progress=false",
                  cwd=tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["p_x2.png"]
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == ["p.png"]
    assert Image.open(tmp_path / "work/p_x2.png").size == (80, 64)
    assert done.stdout.splitlines()[-1] == "wrote p_x2.png (40x32 -> 80x64)"  # no time without progress


@pytest.mark.parametrize(("offline", "download", "says", "never"), [
    ("1", False, "unset HF_HUB_OFFLINE and pass download=true", "network"),
    ("1", True, "HF_HUB_OFFLINE is set: unset it to download", "network"),
    ("", False, "pass download=true to fetch it", "download=True"),
])
def test_missing_weights_say_what_to_type(monkeypatch, tmp_path, offline, download, says, never):
    from latentup.weights.locate import find_file

    monkeypatch.setenv("LATENTUP_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(WeightsNotFoundError) as error:
        find_file("taesd/none.safetensors", "latentup-tests/no-such-repo", download=download)
    assert says in str(error.value) and never not in str(error.value)
