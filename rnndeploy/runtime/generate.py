"""Sampling text from a character language model served by a `StreamingSession`."""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import numpy as np

from rnndeploy.runtime.metadata import quote
from rnndeploy.runtime.session import StreamingSession


class GenerateError(ValueError):
    """The model is not a language model, or the prompt or sampling settings are invalid."""


def vocabulary(session: StreamingSession) -> list[str]:
    """The character vocabulary of a language model (``rnndeploy.vocab`` metadata); token id = list index."""
    task = session.metadata.get("rnndeploy.task")
    if task != "lm" or session.vocab is None:
        raise GenerateError(
            f"this model is not a language model (metadata rnndeploy.task={quote(task)}"
            + ("" if session.vocab is not None else ", no rnndeploy.vocab")
            + "); generate needs a model exported with task='lm'"
        )
    return session.vocab


def generate(
    session: StreamingSession,
    prompt: str,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stream: Hashable = "generate",
) -> Iterator[str]:
    """Feed ``prompt`` to a character LM, then sample ``length`` characters, yielding each as it is drawn.

    The prompt runs as one chunk (``[T]`` token ids), then one step per sampled character. ``temperature`` 0
    picks the most likely character; ``top_k`` samples among the k most likely. ``stream`` is the session
    stream used (reset at the start, closed at the end).

    Raises:
        GenerateError: not an LM, empty prompt, characters outside the vocabulary, bad settings.
    """
    vocab = vocabulary(session)
    if not prompt:
        raise GenerateError("the prompt is empty; give at least one character to start from")
    ids = encode(session, prompt, "prompt")
    if length < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise GenerateError(
            f"need length >= 0, temperature >= 0, top_k >= 1; got {length}, {temperature}, {top_k}"
        )
    rng = np.random.default_rng(seed)
    session.reset(stream)
    try:
        scores = _last_scores(session, ids, stream)
        for i in range(length):
            token = sample_token(scores, temperature, top_k, rng)
            yield vocab[token]
            if i + 1 < length:
                scores = _last_scores(session, np.array([token], np.int64), stream)
    finally:
        session.reset(stream)


def read_text(
    session: StreamingSession,
    text: str,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    stream: Hashable = "read",
) -> Iterator[tuple[str, str, float]]:
    """Feed ``text`` to a character LM one character per step; after each, the model's next character.

    Yields ``(character fed, next character, its log-probability)``: the most likely next character, or with
    ``temperature`` > 0 one sampled at that temperature. ``stream`` is reset at the start and the end.

    Raises:
        GenerateError: not an LM, characters outside the vocabulary, a negative temperature.
    """
    vocab = vocabulary(session)
    ids = encode(session, text, "text")
    if temperature < 0:
        raise GenerateError(f"need temperature >= 0; got {temperature}")
    rng = np.random.default_rng(seed)
    session.reset(stream)
    try:
        for char, token in zip(text, ids, strict=True):
            scores = _last_scores(session, token[None], stream)
            picked = sample_token(scores, temperature, None, rng)
            yield char, vocab[picked], float(scores[picked])
    finally:
        session.reset(stream)


def encode(session: StreamingSession, text: str, what: str = "text") -> np.ndarray:
    """``text`` as token ids ``[len(text)]`` int64 through a character LM's vocabulary.

    Raises:
        GenerateError: naming the characters (``what``: how the text is called in the message) that are not
            in the vocabulary.
    """
    vocab = vocabulary(session)
    index = {token: i for i, token in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise GenerateError(
            f"{what} characters {quote(unknown)} are not in the model's vocabulary ({len(vocab)} characters: "
            f"{quote(''.join(vocab))})"
        )
    return np.array([index[c] for c in text], np.int64)


def _last_scores(session: StreamingSession, ids: np.ndarray, stream: Hashable) -> np.ndarray:
    """Log-probabilities ``[V]`` of the token after ``ids`` (fed to ``stream``)."""
    output = "output" if "output" in session.outputs else next(iter(session.outputs))
    scores = session.step(ids, stream)[output][-1].astype(np.float64)
    return log_probs(scores, session.head)


def log_probs(y: np.ndarray, head: str | None) -> np.ndarray:
    """Log-probabilities over the last axis from a model's output with head ``head`` (``log_softmax``,
    ``softmax``, or raw scores for ``identity`` / a model without rnndeploy metadata)."""
    if head == "log_softmax":
        return y
    if head == "softmax":
        return np.log(np.clip(y, 1e-30, None))
    z = y - y.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def sample_token(scores: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Draw a token id from unnormalised log-probabilities ``scores`` ``[V]``."""
    if temperature == 0:
        return int(np.argmax(scores))
    scores = scores / temperature
    if top_k is not None and top_k < scores.size:
        cutoff = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    return int(rng.choice(scores.size, p=probs / probs.sum()))
