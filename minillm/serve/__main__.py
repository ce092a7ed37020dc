"""Serve a minillm model over HTTP: the OpenAI-style API and the inspector page.

    python -m minillm.serve --model weights/smollm2-135m.safetensors            # http://127.0.0.1:8000
    python -m minillm.serve --model M --draft D --amateur A --port 8080 --threads 2

Routes: / (the inspector page), /v1/models, /v1/completions, /v1/chat/completions (the model's chat
template), with stream, max_tokens, temperature, top_p, seed, stop, n and usage in tokens; the
"minillm" field of a request picks speculative (needs --draft) or contrastive (needs --amateur)
decoding. The models are loaded once, when the server starts; requests cannot name files.

Requests queue, they are not batched: one worker thread decodes one request at a time (so no two
ever share a KV cache) while the event loop keeps accepting, streaming and noticing clients that
leave. Binds 127.0.0.1 unless --host says otherwise. Needs the serve extra: pip install -e ".[serve]".
We use Starlette on uvicorn rather than FastAPI: the API is five routes whose bodies we check
ourselves (so every error names its field, in OpenAI's error shape), which is all Starlette gives,
without FastAPI's pydantic layer on top.
"""

from __future__ import annotations

import sys

from ..checkpoint import load_model
from ..device import pick_device
from ..flags import Parser, add_input, add_threads, fail, integer, real
from ..methods import load_partner
from ..speed import speed_layer
from .state import Limits, Served

LOOPBACK = "127.0.0.1"
DEFAULTS = Limits()


def make_parser() -> Parser:
    p = Parser(prog="python -m minillm.serve", description=__doc__)
    add_input(p, "--model", required=True, help="checkpoint to serve (our format; python -m minillm.convert first)")
    add_input(p, "--draft", default=None, metavar="PATH", help="draft model for speculative decoding (same tokenizer)")
    add_input(p, "--amateur", default=None, metavar="PATH", help="amateur model for contrastive decoding (same tokenizer)")
    p.add_argument("--host", default=None, help=f"address to bind (default: {LOOPBACK}, this machine only; any other "
                   "address lets the network in, and is warned about)")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--max-prompt-tokens", type=integer(1), default=DEFAULTS.max_prompt_tokens,
                   help=f"longest prompt accepted, in tokens (default: {DEFAULTS.max_prompt_tokens})")
    p.add_argument("--max-tokens", type=integer(1), default=DEFAULTS.max_tokens,
                   help=f"largest max_tokens a request may ask for, and the default (default: {DEFAULTS.max_tokens})")
    p.add_argument("--max-sessions", type=integer(1, 10_000), default=DEFAULTS.max_sessions,
                   help=f"requests open at once, decoding or queued; more get 429 (default: {DEFAULTS.max_sessions})")
    p.add_argument("--session-seconds", type=real(0, 86_400, low_open=True), default=DEFAULTS.session_seconds,
                   help="a request decoding longer than this is ended, finish_reason length "
                        f"(default: {DEFAULTS.session_seconds:g})")
    p.add_argument("--device", default="auto", help="where the models run (default: auto)")
    add_threads(p)
    return p


def load_served(args):
    """The models, loaded once (the draft and amateur checked against the model's tokenizer)."""
    device = pick_device(args.device)
    model = load_model(args.model, device)
    draft = load_partner(args.draft, "draft", model, device) if args.draft else None
    amateur = load_partner(args.amateur, "amateur", model, device) if args.amateur else None
    for m in (model, draft, amateur):
        if m is not None:
            speed_layer(m.model)
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_sessions, args.session_seconds)
    return Served(model, draft, amateur, limits, model_path=args.model)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        import uvicorn

        from .app import build_app  # Starlette
    except ImportError as e:
        return fail(f"serving needs the serve extra ({e.name} is missing): pip install -e \".[serve]\"")
    host = args.host or LOOPBACK
    if args.host is not None and args.host not in (LOOPBACK, "localhost", "::1"):
        print(f"warning: binding {host}: other machines can reach this server and run the model; it has no "
              "authentication", file=sys.stderr)
    try:
        served = load_served(args)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    print(f"serving {served.model_id} on http://{host}:{args.port} (the API under /v1)", file=sys.stderr)
    try:
        uvicorn.run(build_app(served), host=host, port=args.port, log_level="warning")
    finally:
        served.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
