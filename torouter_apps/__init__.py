"""Programs built on the ``torouter`` core and its LangChain adapter.

``torouter_apps.serve`` is the OpenAI-compatible endpoint behind ``torouter serve``;
``torouter_apps.demo`` is the offline end-to-end demo behind ``torouter demo``. The
core never imports this package: its commands reach the ``torouter`` command line as
``torouter.commands`` entry points (see ``torouter_apps.cli``).
"""
