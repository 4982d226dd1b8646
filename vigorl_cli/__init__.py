"""vigorl: visually grounded reinforcement learning for vision-language models.

The package is a library first (``vigorl_cli.data``, ``vigorl_cli.models``, ...) and a CLI second
(``vigorl_cli.cli``): every command parses flags into a :class:`~vigorl_cli.recipe.Recipe` and calls the library.
"""

__version__ = "0.1.0"
