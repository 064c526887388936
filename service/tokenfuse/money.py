"""Money is an integer number of nano-USD (1e-9 USD). Never a float."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000


def usd_to_nano(text: str) -> int:
    """Parse a decimal USD amount ("50.00", "0.01") into nano-USD, exactly.

    Raises ValueError for anything that is not a non-negative decimal with at most
    nine decimal places.
    """
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueError(f"not a USD amount: {text!r}") from exc
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative USD amount: {text!r}")
    nano = value * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"more precision than a nano-dollar: {text!r}")
    return int(nano)


def reported_usd_to_nano(value: int | Decimal | str) -> int:
    """A USD amount a provider reports (a JSON number read as Decimal, never a float),
    rounded up to a whole nano-USD. Raises ValueError when it is not a non-negative
    amount."""
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ValueError(f"not a USD amount: {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a non-negative USD amount: {value!r}")
    # Decimal's // truncates toward zero: round up explicitly.
    return int((amount * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nano: int) -> str:
    """Format nano-USD as a decimal string, trailing zeros trimmed to cents."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    frac_text = f"{frac:09d}".rstrip("0")
    frac_text = frac_text.ljust(2, "0")
    return f"{sign}{whole}.{frac_text}"
