"""Optimisation passes over the IR. Each pass is listed explicitly where it is used."""
