"""The dry run: read and check the whole input, count its tokens and price it, and send nothing.

``--dry-run`` answers "what would this job cost, and how long would it take?" before any money is
spent. It reads every line once (compressed inputs are decompressed on the fly), validates it the
way a real run does (bad lines are reported with their line numbers), and counts each request's
tokens with the model's own encoding. It then reports requests, prompt tokens, the most completion
tokens the requests may use, the estimated cost per model, and the estimated duration at the
limits in force.

Usage:
    parallel-requests --requests_filepath requests.jsonl --request_url https://api.openai.com/v1/chat/completions \\
        --max_requests_per_minute 5000 --max_tokens_per_minute 2000000 --dry-run

    >>> report = plan_dry_run("requests.jsonl", url, TokenEstimator(), PriceTable.load(None), 5000, 2_000_000)
    >>> print(report.to_markdown())

Pitfalls:
    - The cost is an upper bound for output: it assumes every completion uses its ``max_tokens``.
    - Limits left to be learned from the server are taken as the Cookbook's defaults.
"""

# Standard library imports
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Third-party imports
import smart_open

# Local application imports
from tasks.requests.pricing import PriceTable
from tasks.requests.request_formats import InvalidLine, detect_shape, parse_line
from tasks.requests.token_estimation import TokenEstimator, budget_completion_tokens
from tasks.storage.uris import compression_of, is_remote

# How many invalid lines are quoted in the report.
EXAMPLE_LIMIT = 10


@dataclass
class ModelTotals:
    """A dry run's counts for one model.

    Attributes:
        requests: valid requests for the model.
        prompt_tokens: their prompt tokens.
        max_completion_tokens: the most completion tokens they may use.
        cost_usd: the estimated cost (completions at their maximum), or None when the model has no price.
    """

    requests: int = 0
    prompt_tokens: int = 0
    max_completion_tokens: int = 0
    cost_usd: Optional[float] = None


@dataclass
class DryRunReport:
    """What a job would send, cost and take.

    Attributes:
        source: the input.
        rows: non-blank lines.
        invalid_lines: lines that would become error records.
        invalid_examples: the first few of them, with their line numbers.
        models: totals per model.
        requests_per_minute: the request limit the duration is estimated at (None: no limit).
        tokens_per_minute: the token limit the duration is estimated at (None: no limit).
    """

    source: str
    rows: int = 0
    invalid_lines: int = 0
    invalid_examples: List[str] = field(default_factory=list)
    models: Dict[str, ModelTotals] = field(default_factory=dict)
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None

    @property
    def requests(self) -> int:
        """Valid requests."""
        return sum(totals.requests for totals in self.models.values())

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of every valid request."""
        return sum(totals.prompt_tokens for totals in self.models.values())

    @property
    def max_completion_tokens(self) -> int:
        """The most completion tokens every valid request may use."""
        return sum(totals.max_completion_tokens for totals in self.models.values())

    @property
    def estimated_cost_usd(self) -> Optional[float]:
        """The estimated cost of the priced models (None when none is priced)."""
        costs = [totals.cost_usd for totals in self.models.values() if totals.cost_usd is not None]
        return sum(costs) if costs else None

    @property
    def unpriced_models(self) -> List[str]:
        """Models with no price in the table."""
        return sorted(model for model, totals in self.models.items() if totals.cost_usd is None)

    @property
    def estimated_minutes(self) -> float:
        """Minutes the requests take at the limits (the tighter of the two decides)."""
        by_requests = self.requests / self.requests_per_minute if self.requests_per_minute else 0.0
        tokens = self.prompt_tokens + self.max_completion_tokens
        by_tokens = tokens / self.tokens_per_minute if self.tokens_per_minute else 0.0
        return max(by_requests, by_tokens)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly view (the flow's return value in a dry run)."""
        return {
            "dry_run": True, "source": self.source, "rows": self.rows, "requests": self.requests,
            "invalid_lines": self.invalid_lines, "invalid_examples": self.invalid_examples,
            "prompt_tokens": self.prompt_tokens, "max_completion_tokens": self.max_completion_tokens,
            "estimated_cost_usd": self.estimated_cost_usd, "unpriced_models": self.unpriced_models,
            "estimated_minutes": self.estimated_minutes, "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "models": {model: vars(totals) for model, totals in sorted(self.models.items())},
        }

    def to_markdown(self) -> str:
        """The report as markdown (the dry run's artifact, and the command line's output)."""
        cost = self.estimated_cost_usd
        lines = [
            f"# Dry run: {self.source}", "",
            "| measure | value |", "| --- | --- |",
            f"| rows | {self.rows:,} |",
            f"| requests (valid) | {self.requests:,} |",
            f"| invalid lines | {self.invalid_lines:,} |",
            f"| prompt tokens | {self.prompt_tokens:,} |",
            f"| completion tokens, at most | {self.max_completion_tokens:,} |",
            f"| estimated cost (completions at their maximum) | {'unknown' if cost is None else f'${cost:,.4f}'} |",
            f"| estimated duration | {self.estimated_minutes:,.1f} min at {_limit_text(self.requests_per_minute, 'RPM')}"
            f" and {_limit_text(self.tokens_per_minute, 'TPM')} |",
            "", "| model | requests | prompt tokens | completion tokens, at most | cost |", "| --- | --- | --- | --- | --- |",
        ]
        for model, totals in sorted(self.models.items()):
            price = "unknown" if totals.cost_usd is None else f"${totals.cost_usd:,.4f}"
            lines.append(f"| {model} | {totals.requests:,} | {totals.prompt_tokens:,} | {totals.max_completion_tokens:,} | {price} |")
        if self.invalid_examples:
            lines += ["", "Invalid lines:", ""] + [f"- `{example}`" for example in self.invalid_examples]
        return "\n".join(lines) + "\n"


def plan_dry_run(source: str, request_url: str, estimator: TokenEstimator, prices: PriceTable,
                 requests_per_minute: Optional[float], tokens_per_minute: Optional[float],
                 transport_params: Optional[Dict[str, Any]] = None) -> DryRunReport:
    """Read the whole input once and report what it would send, cost and take.

    Args:
        source: the input's path or URI (compressed ones are read through decompression).
        request_url: the target URL (cookbook lines) or the base URL (batch lines).
        estimator: the token estimator.
        prices: the price table.
        requests_per_minute: the request limit for the duration estimate (None: none).
        tokens_per_minute: the token limit for the duration estimate (None: none).
        transport_params: smart-open's transport parameters for a remote input.

    Returns:
        The report.
    """
    report = DryRunReport(source=source, requests_per_minute=_finite(requests_per_minute),
                          tokens_per_minute=_finite(tokens_per_minute))
    name = os.path.basename(source)
    compression = compression_of(source) or "disable"
    params = transport_params if is_remote(source) else None
    with smart_open.open(source, "rb", compression=compression, transport_params=params) as handle:
        shape = detect_shape(handle)
    with smart_open.open(source, "rb", compression=compression, transport_params=params) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            report.rows += 1
            parsed = parse_line(raw, shape, request_url, line_number - 1)
            if isinstance(parsed, InvalidLine):
                report.invalid_lines += 1
                if len(report.invalid_examples) < EXAMPLE_LIMIT:
                    report.invalid_examples.append(f"{name} line {line_number}: {parsed.reason}")
                continue
            model = parsed.body.get("model") if isinstance(parsed.body.get("model"), str) else "(no model)"
            prompt, completion = estimator.estimate_parts(parsed.body, parsed.endpoint)
            completion = budget_completion_tokens(parsed.body, parsed.endpoint, completion)
            totals = report.models.setdefault(model, ModelTotals())
            totals.requests += 1
            totals.prompt_tokens += prompt
            totals.max_completion_tokens += completion
    for model, totals in report.models.items():
        totals.cost_usd = prices.cost(model, totals.prompt_tokens, totals.max_completion_tokens)
    return report


# Helpers


def _finite(limit: Optional[float]) -> Optional[float]:
    """None for no limit."""
    return None if limit is None or math.isinf(limit) else limit


def _limit_text(limit: Optional[float], unit: str) -> str:
    """A limit as text: "1,500 RPM", or "no RPM limit"."""
    return f"no {unit} limit" if limit is None else f"{limit:,.0f} {unit}"
