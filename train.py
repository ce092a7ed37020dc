"""Train a char-level model on tinyshakespeare (or any text file).

    python train.py                          # baby preset: 0.8M params, ~2-3 min on a 2-core CPU
    python train.py --family llama           # same size, LLaMA family (RoPE, RMSNorm, SwiGLU)
    python train.py --preset shakespeare     # nanoGPT's 10.7M GPU config
    python train.py --data my.txt --name mine --max-iters 500
    python train.py --resume                 # continue the run named --name exactly where it stopped

Every TrainConfig field (minillm/trainer.py) is a flag; --help lists them with their defaults.
"""

import argparse
import dataclasses
import sys
import typing

from minillm.trainer import TrainConfig, TrainingDiverged, train


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            p.add_argument(flag, type=base, default=f.default, metavar=base.__name__.upper(),
                           help=f"default: {f.default} (preset value)" if f.default is None else f"default: {f.default}")
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
