"""POST /tokenize, POST /detokenize, GET /tokenizer_info in the shapes
lm-evaluation-harness's remote tokenizer expects (vLLM's): `{"tokens": [...]}` for
`{"prompt", "add_special_tokens"}`, `{"prompt": text}` for `{"tokens"}`, and the special
tokens plus chat template. `model` is optional: the default model answers."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from elmd.engine.engine import Engine
from elmd.server import errors
from elmd.server.deps import get_manager
from elmd.server.errors import invalid
from elmd.server.pipeline import check_token_ids
from elmd.server.manager import ModelManager
from elmd.server.openai.messages import template_messages
from elmd.server.openai.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo

router = APIRouter()


async def _engine(manager: ModelManager, model: str | None) -> tuple[str, Engine]:
    model = model or manager.default_model_id()
    if model is None:
        raise invalid("No model is installed; name one with 'model'.", param="model")
    return model, await manager.engine(model)


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             responses=errors.responses(400, 404, 429, 503))
async def tokenize(body: TokenizeRequest, manager: ModelManager = Depends(get_manager)) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise invalid("Send exactly one of 'prompt' and 'messages'.", param="prompt")
    _, engine = await _engine(manager, body.model)
    tokenizer = engine.tokenizer
    if body.messages is not None:
        text = tokenizer.apply_chat_template(template_messages(body.messages), body.add_generation_prompt)
        has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
        tokens = tokenizer.encode(text, add_bos=None if body.add_special_tokens and not has_bos else False)
    else:
        tokens = tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
    return TokenizeResponse(
        count=len(tokens),
        max_model_len=engine.context_length,
        tokens=tokens,
        token_strs=[tokenizer.token_text(t) for t in tokens] if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors.responses(400, 404, 429, 503))
async def detokenize(body: DetokenizeRequest, manager: ModelManager = Depends(get_manager)) -> DetokenizeResponse:
    _, engine = await _engine(manager, body.model)
    check_token_ids(engine, body.tokens, "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=errors.responses(400, 404, 429, 503))
async def tokenizer_info(model: str | None = None, manager: ModelManager = Depends(get_manager)) -> TokenizerInfo:
    model, engine = await _engine(manager, model)
    tokenizer = engine.tokenizer
    return TokenizerInfo(
        model=model,
        tokenizer_class=type(tokenizer).__name__,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=None,
        add_bos_token=tokenizer.add_bos,
        chat_template=tokenizer.chat_template,
        model_max_length=engine.context_length,
        vocab_size=tokenizer.vocab_size,
    )
