"""The files stages hand each other, read and checked without torch or any stage's code.

A stage that only reads another stage's output imports its format from here, so its DVC code deps stay the
code that makes its own output (each stage's deps are the import closure of its module).
"""
