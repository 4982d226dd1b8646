"""Trees → SFT data: single-turn chains (``single``) and multi-turn zoom dialogs (``multiturn``); ``api`` runs both."""
