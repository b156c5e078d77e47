"""LLM explanations scored by simulation (after Bills et al. 2023, as in OpenAI's automated interpretability).

1. Explain: the explainer sees a feature's even-ranked examples with its strongly active tokens marked
   <<like this>> and writes one line.
2. Simulate: given only that line and an odd-ranked (held-out) example, the explainer predicts an
   activation 0-10 for every token; the score is the correlation of the predictions with the truth over
   all held-out tokens.
The explainer is any OpenAI-compatible chat endpoint (HTTPExplainer: --explainer-url or
NANOSAE_EXPLAINER_URL, key from NANOSAE_EXPLAINER_KEY / OPENAI_API_KEY) or the local host model
(LocalExplainer: works offline, e.g. SmolLM2-Instruct). Every answer is gathered before anything is
written, then all rows are written in one transaction: a failing endpoint leaves the database unchanged.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from nanosae.errors import NanosaeError
from nanosae.interp.explain import ACTIVE_FRACTION, Example, write_explanations


class ExplainerError(NanosaeError):
    """The explainer could not be reached or answered nonsense."""


class Explainer(Protocol):
    def complete(self, prompt: str, max_tokens: int) -> str: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: a redirected request would carry the API key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise ExplainerError(f"explainer endpoint {req.full_url} redirected ({code}) to {newurl}; "
                             "give that address as --explainer-url if you trust it")


def is_local(host: str | None) -> bool:
    """localhost, or a loopback address."""
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPExplainer:
    """An OpenAI-compatible /v1/chat/completions endpoint.

    The API key is sent only over https, or over http to this machine (a local server), and never across a
    redirect: a redirect is an error."""

    def __init__(self, url: str, model: str = "gpt-4o-mini", api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/v1/chat/completions" if not self.url.endswith("/v1") else "/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ExplainerError(f"explainer URL {url!r} is not an http(s) address")
        self.model, self.timeout = model, timeout
        self.api_key = api_key or os.environ.get("NANOSAE_EXPLAINER_KEY") or os.environ.get("OPENAI_API_KEY")
        if self.api_key and parts.scheme != "https" and not is_local(parts.hostname):
            raise ExplainerError(f"refusing to send the API key in clear text to {parts.hostname}: use an https "
                                 "explainer URL (plain http is only for servers on this machine)")
        self.opener = urllib.request.build_opener(_NoRedirect)

    def complete(self, prompt: str, max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ExplainerError(f"explainer endpoint {self.url} is unreachable: {getattr(e, 'reason', e)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExplainerError(f"explainer endpoint {self.url} did not answer JSON") from None
        try:
            return str(answer["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ExplainerError(f"explainer endpoint {self.url} answered without choices[0].message.content") from None


class LocalExplainer:
    """The host model itself, prompted in its chat format (offline; small models explain roughly)."""

    def __init__(self, model):
        self.model = model

    def complete(self, prompt: str, max_tokens: int) -> str:
        return self.model.generate(prompt, max_new_tokens=max_tokens, chat=True).text


def marked(example: Example, threshold: float) -> str:
    return "".join(f"<<{t}>>" if a >= threshold else t for t, a in zip(example.tokens, example.acts))


def explanation_prompt(examples: list[Example], max_act: float) -> str:
    threshold = ACTIVE_FRACTION * max_act
    shown = "\n".join(f"{i + 1}. {marked(e, threshold)}" for i, e in enumerate(examples))
    return ("We are studying a feature of a language model. Below are text excerpts where it activates; the tokens "
            "where it is strongly active are marked <<like this>>.\n\n" + shown +
            "\n\nIn one short line, say what the feature responds to. Answer with the description only.")


def simulation_prompt(explanation: str, tokens: list[str]) -> str:
    listing = "\n".join(f"{i}\t{t!r}" for i, t in enumerate(tokens))
    return (f"A feature of a language model is described as: {explanation}\n\nFor each token below (index, tab, token), "
            "predict how strongly the feature activates on it, from 0 (not at all) to 10 (maximally). Answer with one "
            "line per token: index, a tab, the number.\n\n" + listing)


def parse_simulation(reply: str, n: int) -> list[float]:
    """Predicted activations per token index (missing or unreadable lines count as 0)."""
    values = [0.0] * n
    for line in reply.splitlines():
        m = re.match(r"\s*(\d+)\s*[\t:,]\s*(-?\d+(?:\.\d+)?)", line)
        if m and int(m.group(1)) < n:
            values[int(m.group(1))] = float(m.group(2))
    return values


def correlation(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 2:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def explain_and_score(explainer: Explainer, examples: list[Example], max_act: float) -> tuple[str, float]:
    build, held_out = examples[0::2], examples[1::2] or examples[0::2]
    explanation = explainer.complete(explanation_prompt(build, max_act), max_tokens=60).strip().splitlines()
    explanation = explanation[0].strip() if explanation else ""
    predicted, actual = [], []
    for ex in held_out:
        tokens = ex.tokens
        predicted += parse_simulation(explainer.complete(simulation_prompt(explanation, tokens), max_tokens=8 * len(tokens)),
                                      len(tokens))
        actual += ex.acts
    return explanation, correlation(predicted, actual)


def explain_llm(db_path: str | Path, explainer: Explainer, max_features: int | None = 100,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Explain the most frequently firing features (up to max_features); one transaction at the end."""
    return write_explanations(db_path, lambda examples, max_act: explain_and_score(explainer, examples, max_act), "llm",
                              most_frequent_first=True, limit=max_features, progress=progress)
