"""Serve a reward model over HTTP for an RLHF loop (OpenRLHF's --remote_rm_url, verl, a TRL reward function).

    python useful_code/serve_reward_model.py --reward_name_or_path DIR [--port 5000]    # or: make serve

The checkpoint's kind is read from its config: a BT reward model, an exported ArmoRM model (with
--trust_remote_code) or a pairwise preference model. Endpoints:
  POST /get_reward  {"query": [text, ...], "prompts": [...], "labels": [...]} -> {"rewards", "scores", "extra_logs"}
                    (OpenRLHF's shape; each query a chat-templated prompt and response)
  POST /score       {"conversations": [[{"role", "content"}, ...], ...]} -> {"rewards": [...]} (ArmoRM: also
                    "attribute_rewards" and "gating_weights"), templated here with the checkpoint's tokenizer
  POST /compare     {"context": [messages], "responses": [a, b, ...]} -> pairwise probabilities and the winner (PM)
  GET  /health, GET /info
Concurrent requests are gathered for --batch_wait_ms up to --max_batch_tokens and scored as one length-sorted batch.
It listens on 127.0.0.1 unless --host says otherwise; any other address needs --api_key (a bearer token).
"""

import asyncio
import errno
import hmac
import importlib.metadata
import ipaddress
import math
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from useful_code.cli import ModelOutputError, UserError, parse_args, run_cli
from useful_code.defaults import REPO_ROOT
from useful_code.reward_scorer import KINDS, RewardScorer
from useful_code.scoring import split_by_sizes, token_budget_field

DEMO_CHECKPOINT = REPO_ROOT / "outputs" / "demo" / "last_checkpoint"


@dataclass
class ServerArguments:
    """Where the model is, where to listen, and the bounds every request is held to."""

    reward_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "BT, ArmoRM or PM checkpoint (hub name or directory). Default: make demo's checkpoint."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; other than loopback needs --api_key."})
    port: int = field(default=5000, metadata={"min": 0, "max": 65535})
    api_key: Optional[str] = field(default=None, metadata={
        "help": "Bearer token every request but /health must carry (Authorization: Bearer KEY)."})
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "Sequences per padded forward pass."})
    max_tokens_per_batch: int = token_budget_field()
    max_batch_tokens: int = field(default=65536, metadata={
        "min": 1, "help": "Token budget of one gathered batch of concurrent requests."})
    batch_wait_ms: float = field(default=5.0, metadata={
        "min": 0, "help": "How long the first request of a batch waits for others to join it."})
    max_items: int = field(default=512, metadata={"min": 1, "help": "Queries, conversations or responses per request."})
    max_body_bytes: int = field(default=16_000_000, metadata={"min": 1, "help": "Largest request body accepted."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False, metadata={"help": "Run a checkpoint's own code (ArmoRM)."})
    load_pickled_weights: bool = field(default=False)


def is_loopback(host: str) -> bool:
    """Whether host names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DynamicBatcher:
    """Gathers the sequences of concurrent requests for up to wait_s (or until max_tokens) and scores them in one
    call, on one worker thread (the model is never run by two threads at once); each request gets its own slice
    of the results back."""

    def __init__(self, score, wait_s: float, max_tokens: int):
        self.score, self.wait_s, self.max_tokens = score, wait_s, max_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        # Requests in progress (RequestGate counts them) less those already submitted: the ones worth waiting for.
        self.in_flight = self.submitted = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.batches = 0  # gathered batches run so far (the /info page shows it)

    async def submit(self, sequences: list[list[int]]) -> dict:
        """The score() results of these sequences, computed in a batch with other requests' sequences."""
        future = asyncio.get_running_loop().create_future()
        self.submitted += 1
        try:
            await self.queue.put((sequences, future))
            return await future
        finally:
            self.submitted -= 1

    async def run_in_worker(self, function, *args):
        """function(*args) on the scoring thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            tokens = sum(map(len, items[0][0]))
            deadline = loop.time() + self.wait_s
            while tokens < self.max_tokens and (left := deadline - loop.time()) > 0:
                if self.queue.empty() and self.in_flight <= self.submitted:
                    break  # nobody else is on the way; later arrivals queue up while this batch runs
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                tokens += sum(map(len, items[-1][0]))
            sequences = [s for item_sequences, _ in items for s in item_sequences]
            try:
                results = await self.run_in_worker(self.score, sequences)
            except Exception as err:  # one bad batch fails its own requests, never the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            sizes = [len(item_sequences) for item_sequences, _ in items]
            per_key = {key: split_by_sizes(values, sizes) for key, values in results.items()}
            for n, (_, future) in enumerate(items):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result({key: groups[n] for key, groups in per_key.items()})


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr


class GetRewardRequest(BaseModel):
    query: list[StrictStr] = Field(min_length=1)
    prompts: Optional[list[Any]] = None
    labels: Optional[list[Any]] = None


class ScoreRequest(BaseModel):
    conversations: list[list[Message]] = Field(min_length=1)


class CompareRequest(BaseModel):
    context: list[Message] = Field(min_length=1)
    responses: list[StrictStr] = Field(min_length=2)


class RequestGate:
    """Refuses a POST body over max_bytes, or one of unstated length, before it is read, and counts the POST requests
    in progress for the batcher. A plain ASGI middleware: Starlette's @app.middleware wrapper costs about a
    millisecond per request, a third of a tiny model's forward."""

    def __init__(self, app, max_bytes: int, batcher: "DynamicBatcher"):
        self.app, self.max_bytes, self.batcher = app, max_bytes, batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return await _error(411, "a request body needs a Content-Length header")(scope, receive, send)
        if int(length) > self.max_bytes:
            message = f"request body of {int(length)} bytes is over --max_body_bytes={self.max_bytes}"
            return await _error(413, message)(scope, receive, send)
        self.batcher.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.batcher.in_flight -= 1


def build_app(scorer: RewardScorer, args: ServerArguments, model_name: str) -> FastAPI:
    """The FastAPI application: endpoints, authentication and request bounds around one loaded scorer."""
    batcher = DynamicBatcher(scorer.score, args.batch_wait_ms / 1000, args.max_batch_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.serve_forever())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="reward model server", version=_version(), lifespan=lifespan)

    app.add_middleware(RequestGate, max_bytes=args.max_body_bytes, batcher=batcher)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(422, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own (404, 405) and ours: one shape for all errors
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        return _error(500 if isinstance(err, ModelOutputError) else 400, str(err))

    async def authorized(request: Request) -> None:  # async: FastAPI runs a plain def on a worker thread
        if args.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {args.api_key}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer KEY)")

    def check_count(name: str, items: list) -> None:
        if len(items) > args.max_items:
            raise HTTPException(413, f"{name}: {len(items)} items, over --max_items={args.max_items}")

    def needs_rewards(endpoint: str) -> None:
        if scorer.kind == "pm":
            raise UserError(f"{endpoint}: this server holds a {KINDS['pm']}, which compares responses: use /compare")

    async def rewards_of(sequences: list[list[int]]) -> dict:
        results = await batcher.submit(sequences)
        bad = [i for i, r in enumerate(results["rewards"]) if not math.isfinite(r)]
        if bad:
            raise ModelOutputError(f"the model gave NaN or infinite rewards for items {bad[:10]}")
        return results

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info", dependencies=[Depends(authorized)])
    async def info():
        return {"kind": scorer.kind, "kind_name": KINDS[scorer.kind], "model": model_name,
                "dtype": str(scorer.dtype).replace("torch.", ""), "max_length": args.max_length,
                "version": _version(), "attributes": scorer.attributes, "batches_run": batcher.batches,
                "limits": {"max_items": args.max_items, "max_body_bytes": args.max_body_bytes,
                           "max_batch_tokens": args.max_batch_tokens, "batch_wait_ms": args.batch_wait_ms}}

    @app.post("/get_reward", dependencies=[Depends(authorized)])
    async def get_reward(body: GetRewardRequest):
        needs_rewards("/get_reward")
        check_count("query", body.query)
        for name, values in (("prompts", body.prompts), ("labels", body.labels)):
            if values is not None and len(values) != len(body.query):
                raise UserError(f"{name}: {len(values)} items for {len(body.query)} queries")
        sequences, cut = scorer.encode_texts(body.query)
        results = await rewards_of(sequences)
        return {"rewards": results["rewards"], "scores": results["rewards"],
                "extra_logs": {"truncated": cut, "tokens": sum(map(len, sequences))}}

    @app.post("/score", dependencies=[Depends(authorized)])
    async def score(body: ScoreRequest):
        needs_rewards("/score")
        check_count("conversations", body.conversations)
        conversations = [[m.model_dump() for m in conversation] for conversation in body.conversations]
        for i, conversation in enumerate(conversations):
            if not conversation:
                raise UserError(f"conversations[{i}]: a conversation needs at least one message")
            scorer.check_conversation(conversation, f"conversations[{i}]")
        sequences, cut = scorer.encode_conversations(conversations)
        return {**await rewards_of(sequences), "extra_logs": {"truncated": cut, "tokens": sum(map(len, sequences))}}

    @app.post("/compare", dependencies=[Depends(authorized)])
    async def compare(body: CompareRequest):
        if scorer.kind != "pm":
            raise UserError(f"/compare needs a {KINDS['pm']}; this server holds a {KINDS[scorer.kind]}: use /score")
        check_count("responses", body.responses)
        context = [m.model_dump() for m in body.context]
        scorer.check_conversation(context, "context", ends_with_assistant=False)
        for i, response in enumerate(body.responses):
            scorer.check_conversation(context + [{"role": "assistant", "content": response}], f"responses[{i}]")
        cut_before = scorer.preference.truncated
        result = (await batcher.run_in_worker(scorer.compare, [context], [body.responses]))[0]
        return {**result, "extra_logs": {"truncated": scorer.preference.truncated - cut_before}}

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message}, status_code=status)


def _version() -> str:
    try:
        return importlib.metadata.version("rlhf-reward-modeling")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_bindable(host: str, port: int) -> None:
    """One line, before the model loads, when host:port cannot be listened on (in use, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port whose last connections are in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            # In use, or below 1024 without root: the port is the problem; anything else is the address.
            port_problem = err.errno in (errno.EADDRINUSE, errno.EACCES)
            advice = "pick another --port" if port_problem else "--host must name this machine"
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); {advice}") \
                from None


def main():
    args = parse_args((ServerArguments,))[0]
    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"--host {args.host} is reachable from other machines: pass --api_key to require a bearer "
                        "token, or bind 127.0.0.1")
    check_bindable(args.host, args.port)
    path = args.reward_name_or_path
    if path is None:
        if not (DEMO_CHECKPOINT / "config.json").exists():
            raise UserError("no --reward_name_or_path given and no demo checkpoint: run `make demo` (it writes "
                            f"{DEMO_CHECKPOINT.relative_to(REPO_ROOT)}) or pass --reward_name_or_path DIR")
        path = str(DEMO_CHECKPOINT)
    scorer = RewardScorer.from_pretrained(path, max_length=args.max_length, batch_size=args.batch_size, bf16=args.bf16,
                                          attn_implementation=args.attn_implementation,
                                          trust_remote_code=args.trust_remote_code,
                                          pickled_weights=args.load_pickled_weights,
                                          max_tokens_per_batch=args.max_tokens_per_batch)
    print(f"Serving {KINDS[scorer.kind]} {path} on http://{args.host}:{args.port} "
          f"({'bearer token required' if args.api_key else 'no authentication'})", flush=True)
    uvicorn.run(build_app(scorer, args, path), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
