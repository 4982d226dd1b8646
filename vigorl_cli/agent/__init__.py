"""The grounded agent: parsing model output (:mod:`.parse`) and, later, the multi-turn episode loop.

Import from the submodules (``from vigorl_cli.agent.parse import parse_response``); this package file stays free of
re-exports so that heavy modules added here later are not imported by code that only needs the parser.
"""
