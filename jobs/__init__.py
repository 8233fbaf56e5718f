"""Commands of xmodal-index: click CLI, job configs, runner wiring, logging, exit codes.

The only package that configures logging or turns errors into exit codes.
"""
