"""A local server for minillm models: `python -m minillm.serve --model M` (see __main__.py).

    state.py       Served: the models loaded once, the limits, the one worker queue (run_exclusive)
    errors.py      RequestError and OpenAI's error shape {"error": {"message", "type", "param"}}
    fields.py      reading a JSON body field by field, each failure naming its field
    jobs.py        a /v1 request body -> a Job: prompt ids, decoding method, max_tokens, n, seed, stop
    decode.py      running one Job choice through minillm.methods.stream in the worker thread
    openai_api.py  the /v1 routes (models, completions, chat completions), each request one session
    replies.py     replies in OpenAI's shapes, whole or as server-sent events
    app.py         the Starlette app: the /v1 routes, the page at /, and inspect_api's /api routes
"""
