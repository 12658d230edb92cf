"""`/v1/completions` and `/v1/chat/completions`: requests to engine submissions, events to OpenAI responses."""

from __future__ import annotations

import asyncio
import functools
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import protocol as p
from .api import (
    Choice,
    EventRelay,
    ServerConfig,
    Submission,
    check_key,
    error_response,
    sampling_params,
    streaming_response,
)
from .choice import ChoiceGrammar
from .json_mode import JsonVocabulary
from .json_schema import compile_schema
from .messages import add_message_routes
from .responses import add_response_routes
from .sse import ChunkFormat, delta_json, text_json
from .tool_choice import ToolChoice, added_token_bytes, cache_key, functions_of, tool_call_grammar

SCHEMAS_KEPT = 64  # compiled json_schema and choice grammars kept, so repeated requests with one schema reuse its masks


def add_routes(app: FastAPI, engine, relay: EventRelay, tokenizer, config: ServerConfig, chat) -> None:
    hidden = frozenset(getattr(tokenizer, "eos_token_ids", None) or [])

    token_text = tokenizer.token_text  # " Paris", not decode([id])'s start-of-text "Paris"
    anchor = tokenizer.anchor_token()  # new tokens are decoded after it, not with all before them (Choice)
    bos_added = tokenizer.add_bos_token  # a text prompt is read after BOS (not echoed with it)
    json_vocabulary: list[JsonVocabulary] = []  # built on the first JSON-mode request
    schemas: OrderedDict[str, Any] = OrderedDict()  # compiled json_schema and tool-call grammars (masks are cached
    # per grammar)
    added_tokens: list[dict[int, bytes]] = []  # the added tokens' texts, read on the first forced tool call

    async def constraint_of(req):
        """The per-row constraint factory a request's output constraint asks for (response_format, structured_outputs,
        guided_choice or guided_json; None: unconstrained); the JSON vocabulary is built off the event loop, once."""
        spec = req.output_constraint
        if spec is None:
            return None
        field, kind, value = spec
        grammar = None
        if kind != "json_object":
            key = f"{kind}:" + json.dumps(value, sort_keys=True)
            grammar = schemas.get(key)
            if grammar is None:
                try:
                    grammar = schemas[key] = compile_schema(value) if kind == "json" else ChoiceGrammar(value)
                except ValueError as err:
                    where = "response_format.json_schema." if field == "response_format" else f"{field}: "
                    raise p.RequestError(f"{where}{err}", param=field.split(".")[0]) from None
                if len(schemas) > SCHEMAS_KEPT:
                    schemas.popitem(last=False)
            schemas.move_to_end(key)
        return functools.partial((await vocabulary()).constraint, grammar=grammar)

    async def vocabulary() -> JsonVocabulary:
        """The token trie for constrained decoding, built off the event loop on first use."""
        if not json_vocabulary:
            json_vocabulary.append(await asyncio.to_thread(JsonVocabulary.of, tokenizer))
        return json_vocabulary[0]

    async def tool_call_constraint(tools: list[dict], name: str | None, prompt_ids: list[int], several: bool):
        """The constraint factory of a forced tool call (to `name`, or to any of the tools; `several`: one or more
        calls), after the reasoning when the prompt opened it; compiled grammars are kept, so repeated requests
        with the same tools reuse their masks."""
        kind = chat.format.tool_calls
        if kind is None:
            raise p.RequestError("tool_choice: this model's chat template has no tool-call format, so a tool call "
                                 "cannot be enforced for it", param="tool_choice")
        functions = functions_of(tools, name)
        opens = chat.opens_reasoning(prompt_ids)
        key = "tool_choice:" + cache_key(kind, functions, opens, several)
        choice = schemas.get(key)
        if choice is None:
            grammar = tool_call_grammar(kind, functions, opens, several)
            if not added_tokens:
                added_tokens.append(added_token_bytes(tokenizer))
            choice = schemas[key] = await asyncio.to_thread(ToolChoice, await vocabulary(), grammar, added_tokens[0])
            if len(schemas) > SCHEMAS_KEPT:
                schemas.popitem(last=False)
        schemas.move_to_end(key)
        return choice.constraint

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise p.RequestError(f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                                 param="model", code="model_not_found")

    def check_length(ids: list[int], max_tokens: int | None, what: str) -> int:
        """The max_tokens to use; 400 when the prompt (plus an explicit max_tokens) exceeds the context. Left out,
        it is the rest of the context, or of what the K/V bound holds for the request alone, where that is less
        (so that a request without max_tokens is not refused under `--kv-cache-memory`)."""
        room = config.max_context - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = (f"this request asks for {len(ids) + max_tokens} ({len(ids)} in the {what}, {max_tokens} to "
                     "generate)" if max_tokens is not None else f"the {len(ids)} in the {what} leave none to generate")
            raise p.RequestError(f"this model's maximum context length is {config.max_context} tokens; {asked}",
                                 param=what, code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        if engine.kv_budget is None:
            return room
        return min(room, max(engine.kv_budget.most_to_generate(len(ids)), 1))  # 0: the engine says why it cannot run

    async def run(request: Request, submission: Submission) -> Response | None:
        """Wait for every choice of a non-streaming request; an error response, or None when all finished."""
        try:
            async for _ in submission.events(request):
                pass
        except ConnectionAbortedError:
            return Response(status_code=499)
        except RuntimeError as err:
            return error_response(500, str(err), "server_error")
        finally:
            submission.cancel()
        return None

    def render(req: p.ChatCompletionRequest) -> tuple[list[dict], list[dict] | None, list[int]]:
        """A chat request's messages and tools as the template reads them, and the prompt's token ids."""
        if chat is None:
            raise p.RequestError("this model has no chat template (chat_template in tokenizer_config.json or "
                                 "chat_template.jinja), so it cannot chat; use /v1/completions",
                                 param="messages", code="chat_template_missing")
        messages = [m.for_template() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            ids = chat.encode(messages, tools=tools, documents=req.documents, template_kwargs=req.chat_template_kwargs,
                              add_generation_prompt=req.add_generation_prompt,
                              continue_final_message=req.continue_final_message)
        except chat.error as err:
            raise p.RequestError(f"the chat template rejected these messages: {err}", param="messages") from None
        return messages, tools, ids

    async def start_chat(req: p.ChatCompletionRequest) -> tuple[Submission, list[int], bool]:
        """Render a chat request through the template and submit its choices: (the submission, the prompt ids,
        whether tool calls are parsed from the output). /v1/chat/completions, /v1/responses and /v1/messages all
        start here."""
        messages, tools, ids = render(req)
        ids = truncated(ids, req.truncate_prompt_tokens, config.max_context)
        forced, forced_name = req.forced_tool()
        max_tokens = check_length(ids, req.max_tokens, "messages")
        parse_tools = bool(tools) and req.tool_choice != "none" and not req.json_mode

        skipped = chat.skipped_ids() if req.skip_special_tokens else frozenset()

        def decode(ids: list[int]) -> str:
            return tokenizer.decode([i for i in ids if i not in skipped] if skipped else ids, skip_special_tokens=False)

        choices = [Choice(j, 0, decode, req.stop, hidden, anchor=anchor, keep_stop=req.include_stop_str_in_output)
                   for j in range(req.n)]
        submission = Submission(engine, relay, choices)
        count = req.logprob_count()
        defaults = config.sampling_defaults
        several = forced_name is None and req.parallel_tool_calls is not False  # "required": one or more calls
        constraint = await (tool_call_constraint(tools, forced_name, ids, several) if forced else constraint_of(req))
        submission.submit([ids], [sampling_params(req, max_tokens, c.index, count, defaults, constraint)
                                  for c in choices], chat.system_prefix(messages, ids, req.chat_template_kwargs))
        return submission, ids, parse_tools

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), p.CompletionRequest)
        check_model(req.model)
        given = req.prompts()
        whole = [_prompt_ids(tokenizer, x, config.vocab_size) for x in given]
        prompts = [truncated(ids, req.truncate_prompt_tokens, config.max_context) for ids in whole]
        cut = [len(ids) < len(w) for ids, w in zip(prompts, whole)]
        max_tokens = req.max_tokens or config.default_max_tokens
        for ids in prompts:
            check_length(ids, max_tokens, "prompt")

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens)

        choices = [Choice(i * req.n + j, i, decode, req.stop, hidden, anchor=anchor,
                          keep_stop=req.include_stop_str_in_output) for i in range(len(prompts)) for j in range(req.n)]
        submission = Submission(engine, relay, choices)
        defaults, constraint = config.sampling_defaults, await constraint_of(req)
        params = [sampling_params(req, max_tokens, c.index % req.n, req.logprobs, defaults, constraint)
                  for c in choices]
        scoring = req.echo and req.logprobs is not None  # the echoed prompt's tokens get logprobs too
        for param in params:
            param.prompt_logprobs = req.logprobs if scoring else None
        submission.submit(prompts, params)
        rid, created = p.new_id("cmpl"), p.now()
        # the echo, as OpenAI's and vLLM's: a text prompt as it was sent (without the BOS the tokenizer put before
        # it), token ids (and a truncated prompt's kept tokens: what was read) decoded with their special tokens
        sent_text = [isinstance(x, str) and not c for x, c in zip(given, cut)]
        unechoed_bos = [text and bos_added for text in sent_text]
        echoes = [x if text else tokenizer.decode(ids, skip_special_tokens=False)
                  for x, ids, text in zip(given, prompts, sent_text)] if req.echo else [""] * len(prompts)

        untold = frozenset(tokenizer.all_special_ids) if req.skip_special_tokens else frozenset()

        def logprobs_of(choice: Choice, start: int, offset: int) -> dict | None:
            return None if req.logprobs is None else completion_logprobs(choice.logprobs[start:], token_text, offset,
                                                                         untold=untold)

        def echo_logprobs(choice: Choice) -> dict:
            """The echoed prompt's logprobs: its first token has none (nothing before it), offsets from 0 in the
            echoed text, where a BOS the tokenizer added takes no room (its token is listed, its text not echoed)."""
            ids = prompts[choice.prompt_index]
            first = tokenizer.decode(ids[:1], skip_special_tokens=False)
            skipped = len(first) if unechoed_bos[choice.prompt_index] else 0
            out = completion_logprobs(prompt_entries(ids, choice.prompt_logprobs), token_text, -skipped,
                                      first_text=first)
            out["text_offset"][0] = 0
            return out

        def all_logprobs(choice: Choice) -> dict | None:
            """A whole choice's logprobs: the echoed prompt's first when scoring, then the output's."""
            output = logprobs_of(choice, 0, len(echoes[choice.prompt_index]))
            return joined(echo_logprobs(choice), output) if scoring else output

        if req.stream:
            form = ChunkFormat({"id": rid, "object": "text_completion", "created": created,
                                "model": config.model_name}, "text")

            async def chunks() -> AsyncIterator[bytes | dict]:
                def chunk(choice: Choice, text: str, reason: str | None, logprobs: dict | None) -> bytes:
                    return form.event(choice.index, text_json(text), logprobs, reason)
                sent = {c.index: 0 for c in choices}  # logprob entries already sent
                offsets = {c.index: len(echoes[c.prompt_index]) for c in choices}
                unechoed = {c.index for c in choices if scoring}  # echoed with the prompt logprobs of its first event
                for c in choices:
                    if echoes[c.prompt_index] and not scoring:
                        yield chunk(c, echoes[c.prompt_index], None, None)
                async for choice, delta, ended in submission.events(None):
                    if choice.index in unechoed:
                        unechoed.discard(choice.index)
                        yield chunk(choice, echoes[choice.prompt_index], None, echo_logprobs(choice))
                    if not (delta or ended or req.logprobs is not None):
                        continue
                    logprobs = logprobs_of(choice, sent[choice.index], offsets[choice.index])
                    sent[choice.index] = len(choice.logprobs)
                    offsets[choice.index] += len(delta)
                    yield chunk(choice, delta, choice.finish_reason if ended else None, logprobs)
                if req.stream_options and req.stream_options.include_usage:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                           "choices": [], "usage": submission.usage()}
            return streaming_response(submission, chunks())

        if (failed := await run(request, submission)) is not None:
            return failed
        return {
            "id": rid, "object": "text_completion", "created": created, "model": config.model_name,
            "choices": [{"index": c.index, "text": echoes[c.prompt_index] + c.text,
                         "logprobs": all_logprobs(c),
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": submission.usage(),
        }

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), p.ChatCompletionRequest)
        check_model(req.model)
        submission, ids, parse_tools = await start_chat(req)
        choices, count = submission.choices, req.logprob_count()
        rid, created = p.new_id("chatcmpl"), p.now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name}

        def logprobs_of(choice: Choice, start: int) -> dict | None:
            return None if count is None else {"content": chat_logprobs(choice.logprobs[start:], token_text)}

        if req.stream:
            form = ChunkFormat(head, "delta")

            async def chunks() -> AsyncIterator[bytes | dict]:
                def chunk(index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> bytes:
                    return form.event(index, delta_json(delta), logprobs, reason)
                parsers = {c.index: chat.stream_parser(ids, parse_tools, req.json_mode, stream_tool_calls=True)
                           for c in choices}
                sent = {c.index: 0 for c in choices}
                for c in choices:
                    yield chunk(c.index, {"role": "assistant", "content": ""})
                async for choice, delta, ended in submission.events(None):
                    if not (delta or ended or count is not None):
                        continue
                    parser = parsers[choice.index]
                    parts = parser.feed(delta) if delta else []
                    if ended:
                        parts += parser.flush()
                    logprobs = logprobs_of(choice, sent[choice.index])
                    sent[choice.index] = len(choice.logprobs)
                    for part in parts:
                        if "tool_call" in part:
                            if (part := tool_call_delta(part["tool_call"])) is None:
                                continue
                        yield chunk(choice.index, part, None, logprobs)
                        logprobs = None
                    if logprobs is not None:
                        yield chunk(choice.index, {}, None, logprobs)
                    if ended:
                        calls = parser.finish().tool_calls  # streamed above, as they came
                        yield chunk(choice.index, {}, "tool_calls" if calls else choice.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": submission.usage()}
            return streaming_response(submission, chunks())

        if (failed := await run(request, submission)) is not None:
            return failed
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
            "choices": [chat_choice(chat, c, ids, parse_tools, logprobs_of(c, 0), req.json_mode) for c in choices],
            "usage": submission.usage(),
        })

    add_tokenizer_routes(app, tokenizer, config, chat, check_model)
    add_response_routes(app, config, chat, tokenizer, start_chat, run, check_model)
    add_message_routes(app, config, chat, start_chat, render, run)


def add_tokenizer_routes(app: FastAPI, tokenizer, config: ServerConfig, chat, check_model) -> None:
    """vLLM's /tokenize and /detokenize: what the server would read for a prompt or chat, and the text of ids."""

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), p.TokenizeRequest)
        check_model(req.model)
        if req.messages is None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        elif chat is None:
            raise p.RequestError("this model has no chat template, so it cannot render messages", param="messages",
                                 code="chat_template_missing")
        else:
            try:
                ids = chat.encode([m.for_template() for m in req.messages],
                                  add_generation_prompt=req.add_generation_prompt,
                                  continue_final_message=req.continue_final_message)
            except chat.error as err:
                raise p.RequestError(f"the chat template rejected these messages: {err}", param="messages") from None
        return {"count": len(ids), "max_model_len": config.max_context, "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), p.DetokenizeRequest)
        check_model(req.model)
        if any(t >= config.vocab_size for t in req.tokens):
            raise p.RequestError(f"token ids must be below the vocabulary size {config.vocab_size}", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}


def tool_call_delta(call) -> dict | None:
    """A streamed tool call's step as a chat delta: its start (id, name, empty arguments), then fragments of its
    arguments (None for its end, which chat completions do not mark)."""
    if call.id is not None:
        return {"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}
    if call.arguments:
        return {"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]}
    return None


def chat_choice(chat, choice: Choice, prompt_ids: list[int], parse_tools: bool, logprobs: dict | None,
                plain: bool = False) -> dict:
    """One non-streaming chat choice: content, reasoning_content and tool_calls split from the output text (all of
    it content when `plain`: JSON mode)."""
    out = chat.parse(choice.text, prompt_ids, tools=parse_tools, plain=plain)
    message: dict[str, Any] = {"role": "assistant", "content": out.content or None}
    if out.reasoning_content:
        message["reasoning_content"] = out.reasoning_content
    reason = choice.finish_reason
    if out.tool_calls:
        message["tool_calls"] = out.tool_calls
        reason = "tool_calls"
    if message["content"] is None and not message.get("tool_calls"):
        message["content"] = ""
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def truncated(ids: list[int], keep: int | None, context: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: a prompt (as the template rendered it) longer than `keep` tokens keeps its
    last `keep`, which the length check, the engine and usage.prompt_tokens then count. As at vLLM, -1 keeps the
    context length and a `keep` past the context is a 400."""
    if keep is None:
        return ids
    keep = context if keep == -1 else keep
    if keep > context:
        raise p.RequestError(f"truncate_prompt_tokens ({keep}) is greater than this model's maximum context length "
                             f"({context})", param="truncate_prompt_tokens")
    return ids[-keep:] if len(ids) > keep else ids


def _prompt_ids(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise p.RequestError("the prompt is empty (no tokens)", param="prompt")
        return list(ids)
    if any(t >= vocab_size for t in prompt):
        raise p.RequestError(f"prompt token ids must be below the vocabulary size {vocab_size}", param="prompt")
    return list(prompt)


def completion_logprobs(entries, token_text, offset: int, first_text: str | None = None,
                        untold: frozenset[int] = frozenset()) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists of tokens, their logprobs, top alternatives (None where
    an entry has none: an echoed prompt's first token), offsets. `first_text`: the first token's text as a text's
    start (an echoed prompt's first token, as the echo decodes it). `untold`: tokens the text leaves out (special
    tokens under skip_special_tokens), listed but taking no room, so the offsets stay inside the text."""
    tokens, offsets = [], []
    for token_id, _, _ in entries:
        tokens.append(token_text(token_id) if tokens or first_text is None else first_text)
        offsets.append(offset)
        offset += 0 if token_id in untold else len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if top is None else {token_text(t): lp for t, lp in top} for _, _, top in entries],
        "text_offset": offsets,
    }


def prompt_entries(ids: list[int], scored: list | None) -> list:
    """(token, logprob, top) of each prompt token from the engine's prompt logprobs (`scoring.prefill_scored`):
    the first token has none, and none at all where the engine sent none (a choice that ended without a token)."""
    scored = scored if scored is not None else [(None, None)] * (len(ids) - 1)
    return [(ids[0], None, None)] + [(t, lp, top) for t, (lp, top) in zip(ids[1:], scored)]


def joined(first: dict, second: dict) -> dict:
    """Two completions logprobs one after the other (an echoed prompt's, then the output's)."""
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(entries, token_text) -> list[dict]:
    """OpenAI's chat logprobs content: each token with its logprob, UTF-8 bytes and top alternatives."""
    def item(token_id: int, logprob: float | None) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in (top or [])]} for t, lp, top in entries]

