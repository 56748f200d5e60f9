"""Wire protocol v1, pure (no I/O).

`codes`: close and error codes; `commands`: client commands and their parser;
`frames`: server frames.
"""
