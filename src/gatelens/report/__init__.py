"""Figures (matplotlib, one function each) and the self-contained HTML report."""
