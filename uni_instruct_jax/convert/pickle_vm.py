"""A bounded interpreter of the stdlib pickle opcodes that builds plain data only.

`pickle.Unpickler` calls whatever a file names and keeps C-level state (memo arrays sized by the
file, recursive hashing of keys) that a hostile file can abuse. This interpreter instead:

* resolves GLOBAL / STACK_GLOBAL through a per-load `resolve(module, name)` callback; REDUCE and
  NEWOBJ call only `Allowed` wrappers that the caller wrote (they validate their arguments);
* applies BUILD only to objects a wrapper registered with `Load.buildable` during this load, through
  that object's own validating setter; nothing module-level is ever mutated;
* refuses INST, OBJ, EXT1/2/4 and out-of-band buffers; keys of dicts and items of sets must be
  str, bytes, bool, None or an int below 2**61 - 1 (no hash recursion, no equal-hash flooding);
* charges every object it creates to a byte `Budget` fixed by the caller from the file size, keeps
  the memo in a dict with indices bounded by the pickle's length, and bounds integer literals;
* `check_graph` then walks the result iteratively, refusing cycles, nesting deeper than
  `MAX_DEPTH`, DAGs whose tree expansion is much larger than their node count and shared strings
  that expand past a byte bound, so that later recursive walks of the result are cheap and
  cannot overflow the stack.
"""

import codecs
import dataclasses
import struct
from typing import Any, Callable

MAX_DEPTH = 100  # 4x what the EDM fixtures need (tests/test_hostile_files.py checks it).
MAX_INT_BYTES = 16  # LONG1/LONG4 payload; the torch.save magic number needs 10.
_MAX_KEY_INT = (1 << 61) - 1  # ints below this hash to themselves: no equal-hash flooding.
# Estimated bytes per object the interpreter creates (CPython, 64-bit), charged to the budget.
_OBJECT_BYTES = 64
_ITEM_BYTES = 64
_SET_BYTES = 256


class UnsafePickleError(ValueError):
  """A pickle names a global outside the allow-list or exceeds a bound (nothing it names has run)."""


class CheckpointFormatError(ValueError):
  """A file is missing, truncated, not a pickle, or does not have the expected structure."""


def _malformed(what: str) -> CheckpointFormatError:
  return CheckpointFormatError(f'not a valid pickle ({what})')


class Budget:
  """Bytes that one load may materialise (objects, storages, tensor copies)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.used = 0

  def charge(self, nbytes: int, what: str) -> None:
    self.used += nbytes
    if self.used > self.limit:
      raise UnsafePickleError(f'{what} takes the load past its memory bound of {self.limit} '
                              'bytes (a small multiple of the file size)')


@dataclasses.dataclass(frozen=True)
class Allowed:
  """A validating wrapper that REDUCE (`call(*args)`) or NEWOBJ (`new(*args)`) may run."""
  name: str
  call: Callable[..., Any] | None = None
  new: Callable[..., Any] | None = None


class Load:
  """Per-load state shared by the interpreter and the caller's wrappers."""

  def __init__(self, budget: Budget):
    self.budget = budget
    self.buildable: dict[int, tuple[Any, Callable[[Any], None]]] = {}

  def register(self, obj: Any, setter: Callable[[Any], None]) -> Any:
    """Lets BUILD set `obj`'s state through `setter` (validating) during this load only."""
    self.buildable[id(obj)] = (obj, setter)
    return obj


def check_key(key: Any) -> Any:
  """`key` if it may be hashed into a dict or set, else UnsafePickleError."""
  kind = type(key)
  if kind in (str, bytes, bool, type(None)) or (kind is int and -_MAX_KEY_INT < key < _MAX_KEY_INT):
    return key
  raise UnsafePickleError(f'a dict key or set item is a {kind.__name__} (only str, bytes, bool, '
                          'None and small ints are allowed)')


def describe(obj: Any) -> str:
  """A short description of `obj` for error messages (never a full repr of file data)."""
  if isinstance(obj, (bool, int, float, type(None))):
    return repr(obj)[:40]
  if isinstance(obj, str):
    return repr(obj[:40])
  return type(obj).__name__


class _Machine:
  """Runs one pickle of `data[pos:]` (see the module docstring)."""

  def __init__(self, data: memoryview, pos: int, load: Load,
               resolve: Callable[[str, str], Any], persistent: Callable[[Any], Any] | None):
    self.data, self.pos, self.load = data, pos, load
    self.resolve, self.persistent = resolve, persistent
    self.stack: list = []
    self.marks: list[int] = []
    self.floor = 0  # stack index of the innermost MARK
    self.memo: dict[int, Any] = {}
    self.max_memo = len(data)

  # ------------------------------------------------------------------ reading

  def read(self, n: int) -> memoryview:
    if n < 0 or self.pos + n > len(self.data):
      raise _malformed('data ends early (truncated or a bad length field)')
    chunk = self.data[self.pos:self.pos + n]
    self.pos += n
    return chunk

  def unpack(self, fmt: str) -> Any:
    form = _STRUCTS[fmt]
    pos = self.pos
    if pos + form.size > len(self.data):
      raise _malformed('data ends early (truncated or a bad length field)')
    self.pos = pos + form.size
    return form.unpack_from(self.data, pos)[0]

  def readline(self, encoding: str = 'utf-8') -> str:
    """A newline-terminated text argument (at most 256 bytes) of a protocol-0 opcode."""
    end = bytes(self.data[self.pos:self.pos + 256]).find(b'\n')
    if end < 0:
      raise _malformed('text field is unterminated or longer than 256 bytes')
    return bytes(self.read(end + 1)[:-1]).decode(encoding)

  # ------------------------------------------------------------------ stack helpers

  def push(self, obj: Any, nbytes: int = 0) -> None:
    if nbytes:
      self.load.budget.charge(nbytes, 'a pickled object')
    self.stack.append(obj)

  def pop(self) -> Any:
    if len(self.stack) <= self.floor:
      raise _malformed('stack underflow')
    return self.stack.pop()

  def top(self) -> Any:
    if len(self.stack) <= self.floor:
      raise _malformed('stack underflow')
    return self.stack[-1]

  def pop_mark(self) -> list:
    if not self.marks:
      raise _malformed('has no MARK to pop to')
    start = self.marks.pop()
    self.floor = self.marks[-1] if self.marks else 0
    items = self.stack[start:]
    del self.stack[start:]
    return items

  def put(self, index: int) -> None:
    if not 0 <= index <= self.max_memo:
      raise UnsafePickleError(f'memo index {index} exceeds the pickle length')
    self.load.budget.charge(_ITEM_BYTES, 'the memo')
    self.memo[index] = self.top()

  def get(self, index: int) -> None:
    try:
      self.stack.append(self.memo[index])
    except KeyError:
      raise _malformed(f'memo index {index} was never stored') from None

  def push_text(self, raw: memoryview, kind: type) -> None:
    self.load.budget.charge(len(raw) + _OBJECT_BYTES, 'a pickled string')
    if kind is str:
      self.stack.append(bytes(raw).decode('utf-8', 'surrogatepass'))
    else:
      self.stack.append(kind(raw))

  def push_int(self, raw: memoryview) -> None:
    if len(raw) > MAX_INT_BYTES:
      raise UnsafePickleError(f'integer literal of {len(raw)} bytes (at most {MAX_INT_BYTES})')
    self.push(int.from_bytes(raw, 'little', signed=True), _OBJECT_BYTES)

  # ------------------------------------------------------------------ containers

  def append(self, target: Any, items: list) -> None:
    if type(target) is not list:
      raise UnsafePickleError(f'APPEND onto a {type(target).__name__}')
    self.load.budget.charge(16 * len(items), 'a pickled list')
    target.extend(items)

  def setitems(self, target: Any, items: list) -> None:
    if type(target) is not dict or len(items) % 2:
      raise UnsafePickleError(f'SETITEM onto a {type(target).__name__} or with an odd item count')
    self.load.budget.charge(_ITEM_BYTES * len(items) // 2, 'a pickled dict')
    for i in range(0, len(items), 2):
      target[check_key(items[i])] = items[i + 1]

  def make_set(self, items: list, kind: type) -> Any:
    self.load.budget.charge(_ITEM_BYTES * len(items) + _SET_BYTES, 'a pickled set')
    return kind(check_key(item) for item in items)

  def make_tuple(self, items: list) -> None:
    self.push(tuple(items), 8 * len(items) + _OBJECT_BYTES)

  # ------------------------------------------------------------------ calls

  def call(self, fn: Any, args: Any, new: bool = False) -> None:
    if type(fn) is not Allowed or (fn.new if new else fn.call) is None:
      raise UnsafePickleError(f'{"NEWOBJ" if new else "REDUCE"} on {describe(fn)}'
                              f'{" " + fn.name if type(fn) is Allowed else ""}, '
                              'which is not an allowed callable')
    if type(args) is not tuple:
      raise _malformed(f'arguments of {fn.name} are a {type(args).__name__}')
    self.push((fn.new if new else fn.call)(*args), _OBJECT_BYTES)

  def build(self) -> None:
    state = self.pop()
    target = self.top()
    entry = self.load.buildable.get(id(target))
    if entry is None or entry[0] is not target:
      raise UnsafePickleError(f'BUILD on a {type(target).__name__}, which takes no state')
    entry[1](state)

  def global_(self, module: Any, name: Any) -> None:
    if type(module) is not str or type(name) is not str:
      raise _malformed('STACK_GLOBAL operands are not strings')
    self.push(self.resolve(module, name))

  # ------------------------------------------------------------------ main loop

  def run(self) -> tuple[Any, int]:
    data, u, table, size = self.data, self.unpack, _TABLE, len(self.data)
    while self.pos < size:
      handler = table[data[self.pos]]
      self.pos += 1
      if handler is None:
        if data[self.pos - 1] == ord('.'):  # STOP
          if len(self.stack) != 1 or self.marks:
            raise _malformed('STOP with a malformed stack')
          return self.stack[0], self.pos
        raise UnsafePickleError(f'pickle opcode {chr(data[self.pos - 1])!r} is not supported')
      handler(self, u)
    raise _malformed('data ends before STOP')


def _unsupported(what: str) -> Callable:
  def refuse(machine, u):
    raise UnsafePickleError(f'pickle opcode {what} is not allowed')
  return refuse


def _text_string(m: _Machine, u) -> None:
  """STRING (protocol 0): a quoted, escaped byte string, returned as str (Python 3's default)."""
  line = m.readline('latin-1')
  if len(line) < 2 or line[0] != line[-1] or line[0] not in '\'"':
    raise _malformed('STRING opcode is not quoted')
  raw = codecs.escape_decode(line[1:-1].encode('latin-1'))[0]
  m.push_text(memoryview(raw.decode('ascii').encode()), str)


def _text_int(m: _Machine, u, long: bool = False) -> None:
  line = m.readline()
  if long and line.endswith('L'):
    line = line[:-1]
  if len(line) > 40:
    raise UnsafePickleError(f'integer literal of {len(line)} digits')
  value = {'00': False, '01': True}.get(line) if not long else None
  m.push(int(line) if value is None else value, _OBJECT_BYTES)


def _mark(m: _Machine, u) -> None:
  m.load.budget.charge(_OBJECT_BYTES, 'MARK')
  m.floor = len(m.stack)
  m.marks.append(m.floor)


def _frame(m: _Machine, u) -> None:
  size = u('<Q')
  if size > len(m.data) - m.pos:
    raise _malformed('frame is longer than the data')


_OPS: dict[str, Callable[[_Machine, Any], None]] = {
    '\x80': lambda m, u: u('<B'),  # PROTO
    '\x95': _frame,
    '(': _mark,
    '0': lambda m, u: m.pop(),  # POP
    '1': lambda m, u: m.pop_mark(),  # POP_MARK
    '2': lambda m, u: m.push(m.top()),  # DUP
    'N': lambda m, u: m.push(None),
    '\x88': lambda m, u: m.push(True),
    '\x89': lambda m, u: m.push(False),
    'I': _text_int,
    'L': lambda m, u: _text_int(m, u, long=True),
    'J': lambda m, u: m.push(u('<i'), _OBJECT_BYTES),  # BININT
    'K': lambda m, u: m.push(u('<B')),  # BININT1 (cached small ints)
    'M': lambda m, u: m.push(u('<H'), _OBJECT_BYTES),  # BININT2
    '\x8a': lambda m, u: m.push_int(m.read(u('<B'))),  # LONG1
    '\x8b': lambda m, u: m.push_int(m.read(u('<i'))),  # LONG4
    'F': lambda m, u: m.push(float(m.readline()), _OBJECT_BYTES),
    'G': lambda m, u: m.push(u('>d'), _OBJECT_BYTES),  # BINFLOAT
    'S': _text_string,
    'T': lambda m, u: m.push_text(memoryview(bytes(m.read(u('<i'))).decode('ascii').encode()),
                                  str),  # BINSTRING
    'U': lambda m, u: m.push_text(memoryview(bytes(m.read(u('<B'))).decode('ascii').encode()),
                                  str),  # SHORT_BINSTRING
    'V': lambda m, u: m.push_text(memoryview(m.readline('raw-unicode-escape').encode()),
                                  str),  # UNICODE
    'X': lambda m, u: m.push_text(m.read(u('<I')), str),  # BINUNICODE
    '\x8c': lambda m, u: m.push_text(m.read(u('<B')), str),  # SHORT_BINUNICODE
    '\x8d': lambda m, u: m.push_text(m.read(u('<Q')), str),  # BINUNICODE8
    'B': lambda m, u: m.push_text(m.read(u('<I')), bytes),  # BINBYTES
    'C': lambda m, u: m.push_text(m.read(u('<B')), bytes),  # SHORT_BINBYTES
    '\x8e': lambda m, u: m.push_text(m.read(u('<Q')), bytes),  # BINBYTES8
    '\x96': lambda m, u: m.push_text(m.read(u('<Q')), bytearray),  # BYTEARRAY8
    ')': lambda m, u: m.push((), 0),  # EMPTY_TUPLE
    't': lambda m, u: m.make_tuple(m.pop_mark()),  # TUPLE
    '\x85': lambda m, u: m.make_tuple([m.pop()]),  # TUPLE1
    '\x86': lambda m, u: m.make_tuple(list(reversed([m.pop(), m.pop()]))),  # TUPLE2
    '\x87': lambda m, u: m.make_tuple(list(reversed([m.pop(), m.pop(), m.pop()]))),  # TUPLE3
    ']': lambda m, u: m.push([], _OBJECT_BYTES),  # EMPTY_LIST
    'l': lambda m, u: m.push(_filled([], m.pop_mark(), m.append), _OBJECT_BYTES),  # LIST
    'a': lambda m, u: m.append(_peek_below(m), [m.pop()]),  # APPEND
    'e': lambda m, u: _into_marked(m, m.append),  # APPENDS
    '}': lambda m, u: m.push({}, _OBJECT_BYTES),  # EMPTY_DICT
    'd': lambda m, u: m.push(_filled({}, m.pop_mark(), m.setitems), _OBJECT_BYTES),  # DICT
    's': lambda m, u: m.setitems(_peek_below(m, 2), [m.stack.pop(-2), m.stack.pop()]),  # SETITEM
    'u': lambda m, u: _into_marked(m, m.setitems),  # SETITEMS
    '\x8f': lambda m, u: m.push(m.make_set([], set)),  # EMPTY_SET
    '\x90': lambda m, u: _into_marked(m, _add_items),  # ADDITEMS
    '\x91': lambda m, u: m.push(m.make_set(m.pop_mark(), frozenset)),  # FROZENSET
    'p': lambda m, u: m.put(int(m.readline())),  # PUT
    'q': lambda m, u: m.put(u('<B')),  # BINPUT
    'r': lambda m, u: m.put(u('<I')),  # LONG_BINPUT
    '\x94': lambda m, u: m.put(len(m.memo)),  # MEMOIZE
    'g': lambda m, u: m.get(int(m.readline())),  # GET
    'h': lambda m, u: m.get(u('<B')),  # BINGET
    'j': lambda m, u: m.get(u('<I')),  # LONG_BINGET
    'c': lambda m, u: m.global_(m.readline(), m.readline()),  # GLOBAL
    '\x93': lambda m, u: m.global_(*reversed([m.pop(), m.pop()])),  # STACK_GLOBAL
    'R': lambda m, u: m.call(*reversed([m.pop(), m.pop()])),  # REDUCE
    '\x81': lambda m, u: m.call(*reversed([m.pop(), m.pop()]), new=True),  # NEWOBJ
    'b': lambda m, u: m.build(),  # BUILD
    'P': lambda m, u: _persistent(m, m.readline()),  # PERSID
    'Q': lambda m, u: _persistent(m, m.pop()),  # BINPERSID
    'i': _unsupported('INST'), 'o': _unsupported('OBJ'), '\x92': _unsupported('NEWOBJ_EX'),
    '\x82': _unsupported('EXT1'), '\x83': _unsupported('EXT2'), '\x84': _unsupported('EXT4'),
    '\x97': _unsupported('NEXT_BUFFER'), '\x98': _unsupported('READONLY_BUFFER'),
}


_TABLE = [_OPS.get(chr(code)) for code in range(256)]
_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ('<B', '<H', '<i', '<I', '<Q', '>d')}


def _peek_below(m: _Machine, depth: int = 1) -> Any:
  if len(m.stack) <= depth + m.floor:
    raise _malformed('stack underflow')
  return m.stack[-1 - depth]


def _filled(target: Any, items: list, fill: Callable) -> Any:
  fill(target, items)
  return target


def _into_marked(m: _Machine, fill: Callable) -> None:
  items = m.pop_mark()
  fill(m.top(), items)


def _add_items(target: Any, items: list) -> None:
  if type(target) is not set:
    raise UnsafePickleError(f'ADDITEMS onto a {type(target).__name__}')
  target.update(check_key(item) for item in items)


def _persistent(m: _Machine, pid: Any) -> None:
  if m.persistent is None:
    raise _malformed(f'unexpected persistent id ({describe(pid)})')
  m.push(m.persistent(pid), _OBJECT_BYTES)


def run(data: memoryview, pos: int, load: Load, resolve: Callable[[str, str], Any],
        persistent: Callable[[Any], Any] | None = None) -> tuple[Any, int]:
  """Interprets the pickle at `data[pos:]` -> (object, position after its STOP)."""
  return _Machine(data, pos, load, resolve, persistent).run()


def no_globals(module: str, name: str) -> Any:
  """A `resolve` for pickles that may name no global at all."""
  raise UnsafePickleError(f'global {module}.{name} is not in the allow-list')


def check_graph(root: Any, children: Callable[[Any], list | None], max_text: int,
                max_depth: int = MAX_DEPTH, expansion: int = 8) -> None:
  """Refuses what would make a later walk of the loaded data costly.

  That is: cycles; nesting deeper than `max_depth`; DAGs whose tree expansion exceeds
  `expansion` x (node count) + 100000 (e.g. a list holding the same list twice, 40 levels deep);
  and more than `max_text` bytes of str/bytes in the tree expansion (one long string referenced
  many times, which a JSON dump or repr would write out each time).

  `children(obj)` lists a container's members (None for a leaf). Iterative: any depth is safe.
  """
  size: dict[int, tuple[int, int]] = {}  # id -> (expanded node count, expanded text bytes)
  path: set[int] = set()
  todo = [(root, False)]
  while todo:
    obj, done = todo.pop()
    members = children(obj)
    if members is None:
      continue
    key = id(obj)
    if done:
      path.discard(key)
      nodes, text = 1, 0
      for child in members:
        child_nodes, child_text = size.get(id(child), (1, _text_bytes(child)))
        nodes, text = nodes + child_nodes, text + child_text
      size[key] = nodes, text
      if nodes > expansion * len(size) + 100000:
        raise UnsafePickleError('shared references expand to a tree far larger than the file')
      if text > max_text:
        raise UnsafePickleError(f'shared strings expand to more than {max_text} bytes')
      continue
    if key in size:
      continue
    if key in path:
      raise UnsafePickleError('the pickled data contains a reference cycle')
    path.add(key)
    if len(path) > max_depth:
      raise UnsafePickleError(f'the pickled data nests deeper than {max_depth} levels')
    todo.append((obj, True))
    for child in members:
      if id(child) in path:
        raise UnsafePickleError('the pickled data contains a reference cycle')
      if id(child) not in size:
        todo.append((child, False))


def _text_bytes(leaf: Any) -> int:
  return len(leaf) if isinstance(leaf, (str, bytes, bytearray)) else 0
