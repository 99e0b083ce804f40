from signalbox.extproc.accounting import Usage, cost_usd


def test_cost_from_prices_per_million_tokens():
    assert cost_usd(Usage(1_000_000, 500_000), 2.0, 8.0) == 6.0
    assert cost_usd(Usage(10, 7), 0.1, 0.4) == (10 * 0.1 + 7 * 0.4) / 1e6
