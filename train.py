"""Train a char-level model on tinyshakespeare (or any text file), or fine-tune / distil a checkpoint.

    python train.py                          # baby preset: 0.8M params, ~2-3 min on a 2-core CPU
    python train.py --family llama           # same size, LLaMA family (RoPE, RMSNorm, SwiGLU)
    python train.py --preset shakespeare     # nanoGPT's 10.7M GPU config
    python train.py --data my.txt --name mine --max-iters 500
    python train.py --resume                 # continue the run named --name exactly where it stopped

Fine-tune a checkpoint: its weights, config and tokenizer (BPE text is tokenized once and cached):
    python train.py --init-from weights/smollm2-135m.safetensors --name smollm2-shakespeare
                    --seq-len 128 --batch-size 4 --max-iters 200 --lr 3e-5 --min-lr 3e-5 --warmup-iters 0
    add --lora-rank 8 --lora-alpha 16 --lora-targets q,k,v,o (and a larger --lr, e.g. 1e-3) to train
    adapters only (NAME.lora.safetensors); --merge also writes them folded into NAME.safetensors.
Distil a small student from a teacher with the same tokenizer:
    python train.py --distill-from weights/smollm2-135m.safetensors --name draft --family llama
                    --n-layer 4 --n-embd 256 --n-head 4 --block-size 2048 --seq-len 128
    (or --init-from-layers 6 instead of the shape flags: the teacher's first 6 blocks)

Every TrainConfig field (minillm/trainer.py) is a flag, plus --progress/--no-progress (a tqdm bar);
--help lists them with their defaults. The trainer names fields in its errors (lora_rank); here they
are shown as flags (--lora-rank).
"""

import argparse
import dataclasses
import inspect
import re
import sys
import typing

from tqdm import tqdm

from minillm.ddp import exit_process
from minillm.trainer import ARCH_FIELDS, TRAIN_PRESETS, Step, TrainConfig, TrainingDiverged, train

PRESET_FIELDS = {*ARCH_FIELDS, *(k for p in TRAIN_PRESETS.values() for k in p)}  # None: the preset's value


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each dataclass field in its source: it becomes the flag's help."""
    found = (re.match(r"\s+(\w+): [^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def make_parser() -> argparse.ArgumentParser:
    """A flag for every TrainConfig field (type and default from the field, help from its comment)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        note = f"{comments[f.name]}; " if f.name in comments else ""
        if f.default is None and f.name in PRESET_FIELDS:
            note += "(None: the preset's value) "
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                           help=note.rstrip("; ") or None)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            p.add_argument(flag(f.name), type=base, default=f.default, metavar=base.__name__.upper(),
                           help=f"{note}default: {f.default}")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar over the steps")
    return p


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def parse_args(argv=None) -> TrainConfig:
    return config_of(make_parser().parse_args(argv))


class ProgressBar:
    """A tqdm bar fed by the trainer's report after each step: train(tc, on_step=bar)."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: Step) -> None:
        if self.bar is None:  # the first report says where the run starts (later than 0 when resumed)
            self.bar = tqdm(total=step.stop - step.first, desc="train", unit="it", dynamic_ncols=True, mininterval=1.0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.1e}", tok_s=f"{step.tokens / step.ms * 1000:,.0f}")
        if step.iter == step.stop:  # the last step: the final eval's line goes below the bar
            self.bar.close()

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
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"\n{flag_message(e) or 'interrupted'}", file=sys.stderr)  # below the ^C the terminal echoed
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # ConfigError is a ValueError; FileNotFoundError an OSError
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_process(main())  # sys.exit, or under torchrun os._exit (see minillm.ddp.exit_process)
