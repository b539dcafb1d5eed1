"""The C{twistd stui} plugin: a lazy service maker, nothing imported until used."""

from twisted.application.service import ServiceMaker

stui = ServiceMaker(
    "stui-twisted",
    "stui_twisted.tap",
    "Durable multi-client STUI sessions over TCP/TLS/ZeroMQ with a live Python image",
    "stui",
)
