"""Serving a trained model: `nanochat chat` (terminal) and `nanochat serve` (web UI + OpenAI API).

    nanochat chat --source sft -p "Why is the sky blue?"
    nanochat serve --source sft --port 8000          # then open http://127.0.0.1:8000/

Modules: `loading` (checkpoint -> replicas), `generation` (a conversation -> the job whose tokens become
streamed reply pieces), `completion` (text completion and its logprobs), `pool` (each replica decodes its
requests together in one batch), `schemas` (request shapes, input limits, unsupported fields), `app` (the
FastAPI factory), `server` / `cli` (the two commands), `static/index.html` (the page, no external assets).
"""
