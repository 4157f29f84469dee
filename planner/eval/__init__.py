"""Predictions against measurements: backtest of published-run tables and the efficiency fit."""
