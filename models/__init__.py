"""Reward-model side of rmserve: model kinds, engines, chat rendering and registry specs."""
