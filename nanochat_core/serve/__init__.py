"""Serving a trained model: `nanochat chat` (terminal) and `nanochat serve` (web UI + OpenAI API).

    nanochat chat --source sft -p "Why is the sky blue?"
    nanochat serve --source sft --port 8000          # then open http://127.0.0.1:8000/

Modules: `loading` (checkpoint -> replicas), `generation` (the one function that turns a conversation
into streamed reply pieces), `pool` (replicas and the request queue), `schemas` (request shapes and
input limits), `app` (the FastAPI factory), `server` / `cli` (the two commands), `static/index.html`
(the page, no external assets).
"""
