"""--push_to_hub (useful_code/hub.py): the final, verified checkpoint is uploaded to the root of the Hub repository
after the run is published, never by the Trainer during training; a failed upload is one line. No test reaches the
network: the Hub client is replaced, or offline mode is on."""

import sys
from types import SimpleNamespace

import huggingface_hub
import pytest

from helpers import ROOT, run
from useful_code.cli import UserError, parse_args
from useful_code.hub import FinalCheckpointPush, hub_repo_id, push_checkpoint

TRAIN = str(ROOT / "bradley-terry-rm" / "train.py")


def hub_args(tmp_path, **given):
    fields = {"hub_model_id": None, "hub_private_repo": None, "hub_token": None, "hub_revision": None,
              "output_dir": str(tmp_path / "my-rm")}
    return SimpleNamespace(**{**fields, **given})


class RecordingApi:
    """HfApi's two calls push_checkpoint makes, recorded; create_repo answers with the namespaced id."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, *, private=None, exist_ok=False):
        RecordingApi.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        full = repo_id if "/" in repo_id else f"me/{repo_id}"
        return SimpleNamespace(repo_id=full, url=f"https://huggingface.co/{full}")

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        RecordingApi.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None):
        RecordingApi.calls.append(("upload_folder", repo_id, folder_path, revision))


def test_the_checkpoint_goes_to_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    url = push_checkpoint(hub_args(tmp_path, hub_token="t0k", hub_private_repo=True), "/runs/x/last_checkpoint")
    assert url == "https://huggingface.co/me/my-rm"  # the output directory's name, in the token's namespace
    assert RecordingApi.calls == [("create_repo", "my-rm", True, True, "t0k"),
                                  ("upload_folder", "me/my-rm", "/runs/x/last_checkpoint", None)]
    RecordingApi.calls = []
    push_checkpoint(hub_args(tmp_path, hub_model_id="org/rm-v2", hub_revision="dev"), "/runs/x/last_checkpoint")
    assert RecordingApi.calls[1:] == [("create_branch", "org/rm-v2", "dev", True),  # upload_folder needs it
                                      ("upload_folder", "org/rm-v2", "/runs/x/last_checkpoint", "dev")]


def test_a_failed_upload_is_one_line_saying_the_run_is_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        push_checkpoint(hub_args(tmp_path, hub_model_id="org/rm"), "/runs/x/last_checkpoint")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--push_to_hub: uploading /runs/x/last_checkpoint to org/rm "
                                                      "failed (")
    assert message.endswith("the run is complete there: upload it later with "
                            "`hf upload org/rm /runs/x/last_checkpoint .`")
    with pytest.raises(UserError) as err:  # the command keeps the repository's settings
        push_checkpoint(hub_args(tmp_path, hub_model_id="org/rm", hub_private_repo=True, hub_revision="dev"),
                        "/runs/x/last_checkpoint")
    assert str(err.value).endswith("`hf upload org/rm /runs/x/last_checkpoint . --private --revision dev`")


@pytest.mark.parametrize("script", ["bradley-terry-rm/train.py", "pair-pm/train.py", "math-rm/train.py",
                                    "math-rm/scalar_orm_train.py"])
def test_the_trainer_itself_never_pushes(script, tmp_path, monkeypatch):
    """Every trainer's arguments take --push_to_hub for the final checkpoint and hide it from the Trainer (which
    would create the repository before training and push the output directory at every save)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{tmp_path.name}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "argv", [script])
    spec.loader.exec_module(module)
    config = next(cls for cls in vars(module).values() if isinstance(cls, type) and issubclass(cls, FinalCheckpointPush)
                  and cls is not FinalCheckpointPush)
    parsed = parse_args([config], None, argv=["--output_dir", str(tmp_path / "run-7"), "--push_to_hub"])[0]
    assert parsed.push_to_hub is False and parsed.push_final_checkpoint is True
    assert hub_repo_id(parsed) == "run-7"
    assert parse_args([config], None, argv=["--output_dir", str(tmp_path)])[0].push_final_checkpoint is False


def test_hub_strategies_are_said_to_be_unused(tmp_path, capsys):
    from transformers import TrainingArguments

    class Config(FinalCheckpointPush, TrainingArguments):
        pass

    Config(output_dir=str(tmp_path), push_to_hub=True, hub_strategy="checkpoint")
    assert capsys.readouterr().out == ("note: --hub_strategy checkpoint not used: only the final, verified checkpoint "
                                       "is pushed\n")
    Config(output_dir=str(tmp_path), push_to_hub=True)
    Config(output_dir=str(tmp_path), hub_strategy="checkpoint")  # no push asked for
    assert capsys.readouterr().out == ""


@pytest.mark.e2e
def test_training_publishes_then_a_failed_push_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run([sys.executable, TRAIN, "--output_path", str(out), "--max_steps", "1", "--push_to_hub",
                "--hub_model_id", "org/tiny-rm"], {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --push_to_hub: uploading "
                                                           f"{out / 'last_checkpoint'} to org/tiny-rm failed (")
    assert (out / "metrics.json").is_file() and (out / "last_checkpoint" / "model.safetensors").is_file()
