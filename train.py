"""Train a char-level model on tinyshakespeare (or any text file), or fine-tune / distil a checkpoint.

    python train.py                          # baby preset: 0.8M params, ~2-3 min on a 2-core CPU
    python train.py --family llama           # same size, LLaMA family (RoPE, RMSNorm, SwiGLU)
    python train.py --preset shakespeare     # nanoGPT's 10.7M GPU config
    python train.py --data my.txt --name mine --max-iters 500
    python train.py --resume                 # continue the run named --name exactly where it stopped

Fine-tune a checkpoint: its weights, config and tokenizer (BPE text is tokenized once and cached):
    python train.py --init-from weights/smollm2-135m.safetensors --data my.txt --name mine
    (preset finetune: 60 iters of 4 x 128 tokens, lr 1e-4; the text needs ~5 KB for its val split)
    add --lora-rank 8 (preset lora: lr 1e-3) to train adapters only (NAME.lora.safetensors); --merge
    also writes them folded into NAME.safetensors. --keep last keeps the latest weights, not the best.
Distil a small student from a teacher with the same tokenizer:
    python train.py --distill-from weights/smollm2-135m.safetensors --name draft --family llama
                    --n-layer 4 --n-embd 256 --n-head 4 --block-size 2048 --seq-len 128
    (or --init-from-layers 6 instead of the shape flags: the teacher's first 6 blocks)

Every TrainConfig field (minillm/train_config.py) is a flag, plus --progress/--no-progress (a tqdm bar);
--help lists them with their defaults. The trainer names fields in its errors (lora_rank); here they
are shown as flags (--lora-rank).
"""

import argparse
import dataclasses
import inspect
import re
import sys
import time
import typing

from tqdm import tqdm

from minillm.ddp import exit_process
from minillm.flags import Parser, add_input, add_output, add_threads, fail, integer, real
from minillm.train_config import ARCH_FIELDS, FLOAT_RANGES, INT_AT_LEAST, KEEPS, MAX_SEED, TRAIN_PRESETS, TrainConfig
from minillm.train_setup import train
from minillm.trainer import Step, TrainingDiverged

PRESET_FIELDS = {*ARCH_FIELDS, *(k for p in TRAIN_PRESETS.values() for k in p)}  # None: the preset's value
INPUTS = ("data", "init_from", "distill_from")  # files the run reads; out_dir is where it writes
CHOICES = {"preset": sorted(TRAIN_PRESETS), "family": ("gpt2", "llama"), "keep": KEEPS, "attn_impl": ("manual", "sdpa")}


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each dataclass field in its source: it becomes the flag's help."""
    found = (re.match(r"\s+(\w+): [^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(name: str, base: type):
    """The flag's type: a number in the range the trainer allows (INT_AT_LEAST, FLOAT_RANGES), else `base`."""
    if name in INT_AT_LEAST:
        return integer(INT_AT_LEAST[name], MAX_SEED)
    if name in FLOAT_RANGES:
        low, high, low_ok, high_ok = FLOAT_RANGES[name]
        return real(low, high, low_open=not low_ok, high_open=not high_ok)
    return base


def add_field(p: Parser, name: str, **kwargs) -> None:
    """The flag of field `name`, declared as an input or output path where it is one (minillm.flags)."""
    if name in INPUTS:
        add_input(p, flag(name), **kwargs)
    elif name == "out_dir":
        add_output(p, flag(name), folder=True, **kwargs)
    else:
        p.add_argument(flag(name), **kwargs)


def help_of(f: dataclasses.Field, comment: str) -> str:
    """A flag's help: the field's comment, then its default (a None default is the preset's value, or
    what the comment says it means)."""
    if f.default is not None:
        default = f"default: {'on' if f.default is True else 'off' if f.default is False else f.default}"
    else:
        default = "default: the preset's value (see --preset)" if f.name in PRESET_FIELDS else ""
    return "; ".join(part for part in (comment, default) if part) or None


def make_parser() -> Parser:
    """A flag for every TrainConfig field (type and default from the field, help from its comment)."""
    p = Parser(description=__doc__)
    hints = typing.get_type_hints(TrainConfig)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, text = hints[f.name], help_of(f, comments.get(f.name, ""))
        if f.name in CHOICES:
            p.add_argument(flag(f.name), choices=CHOICES[f.name], default=f.default, help=text)
        elif kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            add_field(p, f.name, type=value_type(f.name, base), default=f.default, metavar=base.__name__.upper(),
                      help=text)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the steps (a line every 10 s when stderr is not a terminal); default: on")
    add_threads(p)
    return p


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def parse_args(argv=None) -> TrainConfig:
    return config_of(make_parser().parse_args(argv))


class ProgressBar:
    """A tqdm bar fed by the trainer's report after each step: train(tc, on_step=bar). When stderr is
    not a terminal (a log file), a plain line every `every_s` seconds and at the last step instead of
    a bar's redraws (2,000 redraws of one line made 240 KB)."""

    def __init__(self, every_s: float = 10.0, stream=None):
        self.bar, self.stream, self.every_s, self.last = None, stream or sys.stderr, every_s, None

    def __call__(self, step: Step) -> None:
        if not self.stream.isatty():
            return self.line(step)
        if self.bar is None:  # the first report says where the run starts (later than 0 when resumed)
            self.bar = tqdm(total=step.last_iter - step.first, desc="train", unit="it", dynamic_ncols=True, mininterval=1.0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.1e}", tok_s=f"{step.tokens / step.ms * 1000:,.0f}")
        if step.iter == step.last_iter:  # the last step: the final eval's line goes below the bar
            self.bar.close()

    def line(self, step: Step) -> None:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every_s or step.iter == step.last_iter:
            self.last = now
            print(f"train: iter {step.iter}/{step.last_iter} loss {step.loss:.4f} lr {step.lr:.1e} "
                  f"{step.tokens / step.ms * 1000:,.0f} tok/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def flag_message(e: BaseException) -> str:
    """The trainer's message with the TrainConfig fields it names (ConfigError.fields) written as this
    command's flags; a word inside a path (/data/, my_name.txt) is left alone."""
    message = str(e)
    for name in getattr(e, "fields", ()):
        message = re.sub(rf"(?<![\w/\\.-]){name}(?![\w/\\-]|\.\w)", flag(name), message)
    return message


def main(argv=None) -> int:
    """Train; every error a user can cause is one line on stderr: exit 2 (1 when the loss diverged,
    130 on Ctrl-C, which says which checkpoint is the last good one)."""
    args = make_parser().parse_args(argv)
    bar = ProgressBar() if args.progress else None
    try:
        try:
            train(config_of(args), on_step=bar)
        finally:
            if bar is not None:
                bar.close()  # before a message, so that it goes below the bar
    except TrainingDiverged as e:
        return fail(str(e), 1)
    except KeyboardInterrupt as e:
        print(f"\n{flag_message(e) or 'interrupted'}", file=sys.stderr)  # below the ^C the terminal echoed
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # ConfigError is a ValueError; FileNotFoundError an OSError
        return fail(flag_message(e))
    return 0


if __name__ == "__main__":
    exit_process(main())  # sys.exit, or under torchrun os._exit (see minillm.ddp.exit_process)
