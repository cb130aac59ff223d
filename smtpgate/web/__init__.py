"""The monitoring HTTP interface of `smtpgate serve`: JSON API, web page, metrics, probes.

Importing this package imports nothing else: the server binds the interface's sockets
with interface.py, which loads aiohttp and app.py only when the first request comes.
"""
