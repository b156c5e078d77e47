"""LLM explanations, scored by detection (Bills et al. 2023; EleutherAI delphi's "detection").

1. Explain: the explainer sees a feature's building windows where it is active, with its strongly active
   tokens marked <<like this>>, and writes one line.
2. Score: given only that line and a held-out window (active ones, and random or near-miss text where the
   feature is silent), the explainer answers whether the feature fires in it: one short answer per window
   (the local model reads the probability of "Yes" against "No" from one forward pass, no generation). The
   score is the balanced accuracy of those answers (see explain.py).
The explainer is any OpenAI-compatible chat endpoint (HTTPExplainer: --explainer-url or
NANOSAE_EXPLAINER_URL, key from NANOSAE_EXPLAINER_KEY / OPENAI_API_KEY) or the local host model
(LocalExplainer: works offline, e.g. SmolLM2-Instruct). Every answer is gathered before anything is
written, then all rows are written in one transaction: a failing endpoint leaves the database unchanged.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from nanosae.config import ExplainConfig
from nanosae.errors import FormatError, NanosaeError
from nanosae.interp.explain import (
    Detection,
    Evidence,
    Example,
    by_activity,
    detection,
    explain_n2g,
    is_hard,
    write_explanations,
)
from nanosae.io import is_number, parse_json, read_json
from nanosae.rundir import load_sae_and_model


class ExplainerError(NanosaeError):
    """The explainer could not be reached or answered nonsense."""


class Explainer(Protocol):
    def complete(self, prompt: str, max_tokens: int) -> str: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: a redirected request would carry the API key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise ExplainerError(
            f"explainer endpoint {req.full_url} redirected ({code}) to {newurl}; "
            "give that address as --explainer-url if you trust it"
        )


def is_local(host: str | None) -> bool:
    """`localhost` exactly, or a loopback address (not `evil.localhost`: a resolver may send that anywhere)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPExplainer:
    """An OpenAI-compatible /v1/chat/completions endpoint.

    The API key is sent only over https, or over http to this machine (a local server), and never across a
    redirect: a redirect is an error. A plain-http request that carries the key never goes through a proxy
    (the proxy would read it); an https one may, since a proxy only tunnels its encrypted bytes."""

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
            raise ExplainerError(
                f"refusing to send the API key in clear text to {parts.hostname}: use an https "
                "explainer URL (plain http is only for servers on this machine)"
            )
        no_proxy = [urllib.request.ProxyHandler({})] if self.api_key and parts.scheme == "http" else []
        self.opener = urllib.request.build_opener(_NoRedirect, *no_proxy)

    def complete(self, prompt: str, max_tokens: int) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                answer = parse_json(response.read(), f"explainer endpoint {self.url}")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ExplainerError(f"explainer endpoint {self.url} is unreachable: {getattr(e, 'reason', e)}") from None
        except FormatError:
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

    def says_yes(self, prompts: list[str]) -> list[bool]:
        """Is "Yes" likelier than "No" as the first token of each answer? One batched forward pass: prompts are
        right-padded, and a causal model's logits at a prompt's last token do not see the padding after it."""
        import torch

        tok = self.model.tokenizer
        yes, no = tok.encode("Yes")[0], tok.encode("No")[0]
        ids = [tok.encode_chat(p) for p in prompts]
        width = max(map(len, ids))
        batch = torch.tensor([i + [tok.bos_id] * (width - len(i)) for i in ids])
        yes_no = self.model.logits_at(batch, [len(i) - 1 for i in ids], [yes, no])
        return (yes_no[:, 0] > yes_no[:, 1]).tolist()


def marked(example: Example, threshold: float) -> str:
    return "".join(f"<<{t}>>" if a >= threshold else t for t, a in zip(example.tokens, example.acts))


def explanation_prompt(examples: list[Example], threshold: float) -> str:
    shown = "\n".join(f"{i + 1}. {marked(e, threshold)}" for i, e in enumerate(examples))
    return (
        "We are studying a feature of a language model. Below are text excerpts where it activates; the tokens "
        "where it is strongly active are marked <<like this>>.\n\n"
        + shown
        + "\n\nIn one short line, say what the feature responds to. Answer with the description only."
    )


def detection_prompt(explanation: str, tokens: list[str]) -> str:
    return (
        f"A feature of a language model is described as: {explanation}\n\nText: {''.join(tokens)}\n\n"
        "Does this feature fire anywhere in the text? Answer Yes or No."
    )


def answers(explainer: Explainer, explanation: str, windows: list[list[str]]) -> list[bool]:
    """The explainer's yes/no per window: one batched pass for the local model, one short reply per window
    from an endpoint."""
    prompts = [detection_prompt(explanation, tokens) for tokens in windows]
    if hasattr(explainer, "says_yes"):
        return explainer.says_yes(prompts) if prompts else []
    return [explainer.complete(p, max_tokens=2).strip().lower().startswith("y") for p in prompts]


SCORED_WINDOWS = 30  # held-out windows asked about per feature: this many active, as many silent


def explain_and_score(explainer: Explainer, evidence: Evidence) -> tuple[str | None, Detection | None]:
    """One line from the building windows where the latent is active, scored on held-out natural windows: up to
    SCORED_WINDOWS where it is active and as many where it is silent, half of those hard negatives."""
    _, held_out = evidence.split()
    shown = shown_examples(evidence)
    if not shown:
        return None, None
    answer = explainer.complete(explanation_prompt(shown, evidence.threshold), max_tokens=20)
    explanation = clean_line(answer)
    if not explanation:
        return None, None
    return explanation, score_line(explainer, explanation, evidence)


def score_line(explainer: Explainer, explanation: str, evidence: Evidence) -> Detection | None:
    """An explanation in words, scored on held-out natural windows: the explainer says for each whether the
    feature fires there; up to SCORED_WINDOWS active windows and as many silent, half of those hard negatives."""
    _, held_out = evidence.split()
    active, silent = by_activity(held_out, evidence.threshold)
    hard = evidence.hard_tokens()
    hard_silent = [w for w in silent if is_hard(w.tokens, hard)][: SCORED_WINDOWS // 2]
    random_silent = [w for w in silent if not is_hard(w.tokens, hard)][: SCORED_WINDOWS - len(hard_silent)]
    asked = active[:SCORED_WINDOWS] + hard_silent + random_silent
    said = dict(zip((id(w.tokens) for w in asked), answers(explainer, explanation, [w.tokens for w in asked])))
    return detection(lambda tokens: said[id(tokens)], asked, evidence.threshold, hard)


def shown_examples(evidence: Evidence, n: int = 6) -> list[Example]:
    """What the explainer sees: half the strongest examples and half from across its activation quantiles (so
    the line is about the feature at every strength, not its extremes), where it is active."""
    active = by_activity(evidence.examples, evidence.threshold)[0]
    top, spread = active[: len(evidence.examples)], active[::-1]  # top examples come first, quantiles last
    picked = top[: n // 2] + [e for e in spread if e not in top[: n // 2]][: n - n // 2]
    return picked[:n]


SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<unk>|<pad>|<bos>|<eos>")


def clean_line(answer: str) -> str:
    """The explainer's first line without special tokens (a chat model's <|im_end|>), quotes or a trailing full
    stop."""
    lines = [line.strip() for line in SPECIAL.sub("", answer).strip().splitlines() if line.strip()]
    return lines[0].strip(" \"'`").rstrip(".").strip() if lines else ""


def explain_llm(
    db_path: str | Path,
    explainer: Explainer,
    max_features: int | None = 100,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Explain up to max_features features chosen for interest: enough firings to score, not dense (those fire on
    most tokens), most frequent first; one transaction at the end."""
    return write_explanations(
        db_path,
        lambda evidence: explain_and_score(explainer, evidence),
        "llm",
        most_frequent_first=True,
        interesting_only=True,
        limit=max_features,
        progress=progress,
        explainer=f"{type(explainer).__name__}:{getattr(explainer, 'url', '')}:{getattr(explainer, 'model', '')}",
    )


def explain(run: str | Path, cfg: ExplainConfig, progress: Callable[[int, int], None] | None = None) -> int:
    """What `nanosae explain` does: N2G patterns, or an LLM's lines from the endpoint cfg names (the run's own
    host model without one); the number of features explained."""
    if cfg.method == "n2g":
        return explain_n2g(run, progress=progress)
    if cfg.explainer_url:
        explainer: Explainer = HTTPExplainer(cfg.explainer_url, model=cfg.explainer_model)
    else:
        explainer = LocalExplainer(load_sae_and_model(run, cfg.model, "cpu", None)[2])
    if cfg.method == "user":
        return explain_user(run, explainer, read_user_explanations(Path(str(cfg.explanations))), progress)
    return explain_llm(run, explainer, max_features=cfg.max_features or None, progress=progress)


def read_user_explanations(path: Path) -> dict[int, str]:
    """{"LATENT": "explanation"} from a JSON file, checked (a one-line error naming the file otherwise)."""
    raw = read_json(path)
    out = {}
    for key, text in raw.items():
        if not (isinstance(key, str) and is_number(key) and isinstance(text, str) and text.strip()):
            raise FormatError(f'{path}: expected {{"LATENT": "explanation", ...}}, got {key!r:.30}: {text!r:.40}')
        out[int(key)] = text.strip()
    if not out:
        raise FormatError(f"{path}: no explanations in it")
    return out


def explain_user(
    db_path: str | Path,
    explainer: Explainer,
    lines: dict[int, str],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Your own explanations, stored as method "user" beside the others, each scored on held-out windows by the
    explainer as an LLM's are."""
    return write_explanations(
        db_path,
        lambda evidence: (lines[evidence.latent], score_line(explainer, lines[evidence.latent], evidence)),
        "user",
        only=set(lines),
        progress=progress,
        explainer=f"{type(explainer).__name__}:{getattr(explainer, 'url', '')}:{getattr(explainer, 'model', '')}",
    )
