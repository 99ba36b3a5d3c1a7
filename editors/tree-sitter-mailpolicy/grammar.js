/**
 * @file Tree-sitter grammar for mailpolicy (.mailpolicy files), for highlighting and
 * editor structure. It follows lang/src/grammar.pest (spec/language.md, section 3);
 * `bash editors/test.sh` checks that it parses every policy of the repository that
 * `mailc check` parses, and finds an error in each case of tests/check/syntax_*.
 */

/* eslint-disable no-undef */

const commaSep1 = (rule) => seq(rule, repeat(seq(',', rule)), optional(','));

// Words that begin declarations; elsewhere they are ordinary names (`table t = list "f"`).
const CONTEXTUAL = ['require', 'include', 'list', 'table', 'secret', 'scanner', 'mailing_list', 'server', 'listener',
  'rules', 'on', 'route', 'domains', 'cidr', 'strings'];

module.exports = grammar({
  name: 'mailpolicy',

  extras: ($) => [/\s/, $.comment],

  word: ($) => $.identifier,

  conflicts: ($) => [],

  rules: {
    source_file: ($) => repeat($._item),

    _item: ($) => choice(
      $.require,
      $.include,
      $.list_declaration,
      $.resource_declaration,
      $.settings,
      $.rules_declaration,
      $.stage_block,
    ),

    require: ($) => seq('require', choice($.string, $.string_list), ';'),
    include: ($) => seq('include', $.string, ';'),
    list_declaration: ($) => seq(
      'list', field('name', $._name), '=',
      optional(field('kind', choice('domains', 'cidr', 'strings'))),
      $.string_list, ';',
    ),
    resource_declaration: ($) => seq(
      choice('table', 'secret', 'scanner', 'mailing_list'), field('name', $._name), '=', field('kind', $._name),
      optional($.string), optional($.options), ';',
    ),
    settings: ($) => seq(choice('server', 'listener'), optional(field('name', $._name)), $.options),
    options: ($) => seq('{', repeat($.option), '}'),
    option: ($) => seq(field('name', $._name), $._value, ';'),
    rules_declaration: ($) => seq('rules', field('name', $._name), $.block),
    stage_block: ($) => seq(choice(seq('on', field('stage', $._name)), 'route'), $.block),

    block: ($) => seq('{', repeat($._statement), '}'),
    _statement: ($) => choice($.if_statement, $.action),
    if_statement: ($) => seq(
      'if', field('condition', $._condition), $.block,
      repeat($.elsif_clause), optional($.else_clause),
    ),
    elsif_clause: ($) => seq('elsif', field('condition', $._condition), $.block),
    else_clause: ($) => seq('else', $.block),
    action: ($) => seq(field('name', $._name), repeat(choice($.tag, '=', $._value)), ';'),

    _condition: ($) => choice($.or, $.and, $.not, $.parenthesized, $.allof, $.anyof, $.test),
    or: ($) => prec.left(1, seq($._condition, 'or', $._condition)),
    and: ($) => prec.left(2, seq($._condition, 'and', $._condition)),
    not: ($) => prec(3, seq('not', $._condition)),
    parenthesized: ($) => seq('(', $._condition, ')'),
    allof: ($) => seq('allof', '(', commaSep1($._condition), ')'),
    anyof: ($) => seq('anyof', '(', commaSep1($._condition), ')'),
    test: ($) => prec.right(seq($.term, optional(choice($.null_check, seq($.operator, $._value))))),
    term: ($) => prec.right(seq(field('name', $._name), repeat(choice($.tag, $._value)))),
    null_check: ($) => seq('is', optional('not'), 'null'),
    operator: ($) => choice(':is', ':contains', ':matches', ':regex', 'in', seq('not', 'in'),
      '==', '!=', '<', '<=', '>', '>='),

    _value: ($) => choice($.enhanced_code, $.duration, $.size, $.number, $.string, $.string_list, $._name),
    _name: ($) => choice($.identifier, ...CONTEXTUAL.map((w) => alias(w, $.identifier))),
    string_list: ($) => seq('[', optional(commaSep1(choice($.string, $.number))), ']'),

    identifier: (_) => /[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*/,
    tag: (_) => token(prec(-1, /:[A-Za-z_][A-Za-z0-9_]*/)),
    string: (_) => token(seq('"', repeat(choice(/[^"\\\n]/, /\\(.|\n)/)), '"')),
    enhanced_code: (_) => /\d\.\d{1,3}\.\d{1,3}/,
    duration: (_) => /\d+(ms|s|m|h|d|w)/,
    size: (_) => /\d+[KMG]/,
    number: (_) => /\d+(\.\d+)?/,
    comment: (_) => token(seq('#', /.*/)),
  },
});
