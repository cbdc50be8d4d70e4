from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class execution(_message.Message):
    __slots__ = ("symbol", "market", "price", "quantity", "executionEpoch", "stateSymbol")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONEPOCH_FIELD_NUMBER: _ClassVar[int]
    STATESYMBOL_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    market: str
    price: float
    quantity: float
    executionEpoch: int
    stateSymbol: str
    def __init__(self, symbol: _Optional[str] = ..., market: _Optional[str] = ..., price: _Optional[float] = ..., quantity: _Optional[float] = ..., executionEpoch: _Optional[int] = ..., stateSymbol: _Optional[str] = ...) -> None: ...
