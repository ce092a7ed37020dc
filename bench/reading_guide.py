"""Line counts for README's reading guide: for each idea, the files and functions a reader opens.

    python bench/reading_guide.py                      # this tree
    python bench/reading_guide.py --root OLD --before  # a checkout of 4df3761, with the names it had then

A function's count is its whole definition (`def` line to last line, docstring included), as a
reader meets it; a file's count is `wc -l`.
"""

import argparse
import ast
from pathlib import Path

AFTER = {
    "a forward pass": ["minillm/config.py", "minillm/model.py::Transformer.forward", "minillm/model.py::Attention.forward",
                       "minillm/model.py::Attention.project", "minillm/model.py::Attention.attend", "minillm/model.py::Block.forward",
                       "minillm/model.py::MLP.forward"],
    "the KV cache": ["minillm/kv_cache.py::KVCache.update", "minillm/kv_cache.py::KVCache.crop"],
    "a training step": ["minillm/trainer.py::train_loop", "minillm/trainer.py::forward_backward",
                        "minillm/trainer.py::cross_entropy", "minillm/trainer.py::lr_at"],
    "a decode loop": ["minillm/generate.py::stream_batch", "minillm/sampling.py::choose", "minillm/sampling.py::distribution",
                      "minillm/sampling.py::choose_from", "minillm/generate.py::_record", "minillm/generate.py::next_logits",
                      "minillm/sampling.py::process_logits"],
    "speculative": ["minillm/speculative.py::SpeculativeDecoder.step", "minillm/speculative.py::SpeculativeDecoder._propose",
                    "minillm/speculative.py::SpeculativeDecoder._verify", "minillm/speculative.py::speculative_stream"],
    "contrastive": ["minillm/contrastive.py::contrastive_scores", "minillm/contrastive.py::contrastive_stream"],
    "loading a real checkpoint": ["minillm/convert/gguf.py::load_gguf", "minillm/convert/writer.py::write_checkpoint",
                                  "minillm/convert/writer.py::_check_source", "minillm/convert/writer.py::_plan",
                                  "minillm/convert/writer.py::_header", "minillm/convert/writer.py::_write_tensors",
                                  "minillm/convert/writer.py::_validate_written", "minillm/checkpoint.py::load_model"],
}
BEFORE = {
    "a forward pass": ["minillm/config.py", "minillm/model.py::Transformer.forward", "minillm/model.py::Transformer._forward",
                       "minillm/model.py::Attention.forward", "minillm/model.py::Block.forward", "minillm/model.py::MLP.forward",
                       "minillm/model.py::Linear.forward"],
    "the KV cache": ["minillm/kv_cache.py::KVCache.update", "minillm/kv_cache.py::KVCache.crop"],
    "a training step": ["minillm/trainer.py::_train"],
    "a decode loop": ["minillm/generate.py::stream_batch", "minillm/generate.py::_forward", "minillm/generate.py::left_pad",
                      "minillm/sampling.py::process_logits"],
    "speculative": ["minillm/speculative.py::SpeculativeDecoder.step", "minillm/speculative.py::SpeculativeDecoder._propose",
                    "minillm/speculative.py::SpeculativeDecoder._verify", "minillm/speculative.py::speculative_stream"],
    "contrastive": ["minillm/contrastive.py::contrastive_scores", "minillm/contrastive.py::contrastive_stream"],
    "loading a real checkpoint": ["minillm/convert/gguf.py::load_gguf", "minillm/convert/__init__.py::write_checkpoint",
                                  "minillm/convert/__init__.py::_check_source", "minillm/convert/__init__.py::_validate_written",
                                  "minillm/checkpoint.py::load_model"],
}


def lines(root: Path, ref: str) -> int:
    file, _, qualname = ref.partition("::")
    text = (root / file).read_text()
    if not qualname:
        return len(text.splitlines())
    node = ast.parse(text)
    for part in qualname.split("."):
        node = next(n for n in ast.iter_child_nodes(node) if getattr(n, "name", None) == part)
    return node.end_lineno - node.lineno + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--before", action="store_true", help="use the names of the tree before the core redesign")
    args = ap.parse_args()
    root, guide = Path(args.root), BEFORE if args.before else AFTER
    print("| idea | what to read (lines) | total |\n|---|---|---|")
    for idea, refs in guide.items():
        counts = [(ref.replace("minillm/", ""), lines(root, ref)) for ref in refs]
        print(f"| {idea} | {', '.join(f'`{r}` {n}' for r, n in counts)} | {sum(n for _, n in counts)} |")


if __name__ == "__main__":
    main()
