"""Running the project's scripts from tests, as a user would from the repo root."""

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from useful_code.defaults import REPO_ROOT

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent


def run(cmd, env_extra=None, timeout=600):
    """Run a command from the repo root; return the completed process (output captured)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(proc):
    """Fail with the command's output tail when it did not exit 0."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def sharpened(model, std: float = 0.3, seed: int = 0):
    """A copy of a tiny model with larger random weights (seeded): its outputs vary by several units with the
    tokens and their positions, so a padding, position or row mix-up shows far above test tolerances (the shipped
    std-0.02 weights keep everything close to uniform)."""
    import copy

    import torch

    sharp = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sharp.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return sharp.eval()


def save_sharp_checkpoints(out, seed: int = 1) -> None:
    """A BT and a PM checkpoint in out/bt and out/pm: the tiny model with sharpened random weights (rewards differ
    by units), saved as the trainers save them."""
    import torch

    from useful_code.defaults import DEFAULT_MODEL
    from useful_code.modeling import REWARD_HEAD_WEIGHTS, load_preference_model, load_reward_model
    from useful_code.templates import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
    models = {"bt": load_reward_model(DEFAULT_MODEL, "--m", tokenizer, torch.float32, new_weights=REWARD_HEAD_WEIGHTS),
              "pm": load_preference_model(DEFAULT_MODEL, "--m", tokenizer, torch.float32)}
    for kind, model in models.items():
        sharpened(model, std=0.3, seed=seed).save_pretrained(Path(out) / kind)
        tokenizer.save_pretrained(Path(out) / kind)


def save_tiny_armo(out) -> Path:
    """A tiny ArmoRM as armo-rm/export.py writes one (the tiny backbone, a random head, 3 attributes), saved to out
    with its modeling file (loaded with trust_remote_code). Returns out."""
    import shutil

    import torch
    from transformers import AutoConfig

    from useful_code import modeling_armo_rm
    from useful_code.armo_embeddings import gating_pattern
    from useful_code.defaults import DEFAULT_MODEL
    from useful_code.templates import load_tokenizer

    out = Path(out)
    tokenizer = load_tokenizer(DEFAULT_MODEL, "--model")
    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    config.update({"num_objectives": 3, "attribute_names": ["a", "b", "c"], "gating_hidden_dim": 16,
                   "gating_n_hidden": 1, "gating_temperature": 10.0, "gating_pattern": gating_pattern(tokenizer),
                   "verbosity_penalty": [1.0] * 3, "num_labels": 1, "pad_token_id": tokenizer.pad_token_id,
                   "architectures": ["ArmoRMForSequenceClassification"],
                   "auto_map": {"AutoModelForSequenceClassification":
                                "modeling_armo_rm.ArmoRMForSequenceClassification"}})
    torch.manual_seed(0)
    modeling_armo_rm.ArmoRMForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(modeling_armo_rm.__file__, out / "modeling_armo_rm.py")
    return out


def character_bert_tokenizer(out):
    """A BERT WordPiece tokenizer over printable characters (a vocab.txt written to out): a tiny encoder's."""
    import string

    from transformers import BertTokenizerFast

    symbols = sorted(set(string.printable) - set(string.whitespace))
    (Path(out) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *symbols,
                                                     *(f"##{s}" for s in symbols)]) + "\n")
    return BertTokenizerFast(vocab_file=str(Path(out) / "vocab.txt"), do_lower_case=False)


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(launcher: str) -> list[str]:
    """The command that starts a script on two ranks with torchrun or deepspeed, on a free rendezvous port: the
    default (29500) is taken when another test run launches ranks at the same time."""
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


class Server:
    """The app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, checkpoint, trust_remote_code: bool = False, **flags):
        import uvicorn

        from useful_code.reward_scorer import RewardScorer
        from useful_code.serve_reward_model import ServerArguments, build_app

        # bound now, listened on by uvicorn: a port only looked up here could be taken before the server starts
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        port = self.socket.getsockname()[1]
        self.args = replace(ServerArguments(reward_name_or_path=str(checkpoint), port=port), **flags)
        self.scorer = RewardScorer.from_pretrained(str(checkpoint), max_length=self.args.max_length,
                                                   batch_size=self.args.batch_size, trust_remote_code=trust_remote_code)
        config = uvicorn.Config(build_app(self.scorer, self.args, str(checkpoint)), host="127.0.0.1",
                                port=self.args.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.url = f"http://127.0.0.1:{self.args.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
