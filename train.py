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

Every TrainConfig field (minillm/trainer.py) is a flag; --help lists them with their defaults.
"""

import argparse
import dataclasses
import inspect
import re
import sys
import typing

from minillm.trainer import TRAIN_PRESETS, TrainConfig, TrainingDiverged, train

PRESET_FIELDS = {"n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden", "dropout",
                 *(k for p in TRAIN_PRESETS.values() for k in p)}


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each dataclass field in its source: it becomes the flag's help."""
    found = (re.match(r"\s+(\w+): [^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        note = f"{comments[f.name]}; " if f.name in comments else ""
        if f.default is None and f.name in PRESET_FIELDS:
            note += "(None: the preset's value) "
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=note.rstrip("; ") or None)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            p.add_argument(flag, type=base, default=f.default, metavar=base.__name__.upper(),
                           help=f"{note}default: {f.default}")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    tc = parse_args(argv)
    try:
        train(tc)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
