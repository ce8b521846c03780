"""Pieces that trainers import: gradprobe's outputs in the forms TRL, verl and ROLL take."""
