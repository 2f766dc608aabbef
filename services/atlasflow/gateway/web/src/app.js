// atlasflow's review app: login -> ranked worklist -> case viewer with per-organ decisions.
// State, layout and API calls only; the imaging is NiiVue's (viewer.js).
//
// Routes (location.hash): #/login, #/worklist, #/case/<case_id>.
// Performance marks: `case-open` (a case is opened) and `case-drawn` (CT and overlays drawn);
// each load's measure `case-load` is kept in window.atlasflow.loadTimes (ms).

import { api, ApiError } from './api.js'
import { ORGANS, ORGAN_VALUE, PRESETS, Viewer } from './viewer.js'
import { xorDelta } from './mask.js'

const LEASE_SECONDS = 300
const RENEW_EVERY_MS = 60_000
const STATUSES = ['pending', 'leased', 'accepted', 'revised']

const $view = document.getElementById('view')
const state = { me: null, filters: { organs: [], statuses: [], round: 0 }, caseCtx: null }
const atlasflow = { state, loadTimes: [], viewer: null, ready: false }
window.atlasflow = atlasflow

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v)
    else if (k === 'class') el.className = v
    else if (v === true) el.setAttribute(k, '')
    else el.setAttribute(k, String(v))
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c)
  return el
}

function pretty(organ) {
  return organ.replace('_', ' ')
}

function go(hash) {
  if (location.hash === hash) route()
  else location.hash = hash
}

async function route() {
  await leaveCase()
  const hash = location.hash || '#/worklist'
  if (hash === '#/login') return showLogin()
  try {
    state.me = state.me || (await api.me())
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return go('#/login')
    return showError(e)
  }
  document.getElementById('who').textContent = `${state.me.subject} (${state.me.roles.join(', ')})`
  document.getElementById('logout').hidden = false
  const m = hash.match(/^#\/case\/([A-Za-z0-9._-]+)$/)
  if (m) return showCase(m[1])
  return showWorklist()
}

function showError(e) {
  $view.replaceChildren(h('p', { class: 'error' }, String(e.message || e)))
}

// ------------------------------------------------------------------------ login
function showLogin() {
  state.me = null
  document.getElementById('who').textContent = ''
  document.getElementById('logout').hidden = true
  const msg = h('p', { class: 'error', id: 'login-error' })
  const user = h('input', { id: 'username', autocomplete: 'username', placeholder: 'user (e.g. dr.demo)', required: true })
  const pass = h('input', { id: 'password', type: 'password', autocomplete: 'current-password', placeholder: 'password', required: true })
  const form = h(
    'form',
    {
      class: 'login',
      onsubmit: async (ev) => {
        ev.preventDefault()
        msg.textContent = ''
        try {
          await api.login(user.value, pass.value)
          go('#/worklist')
        } catch (e) {
          msg.textContent = e.status === 401 ? 'Unknown user or wrong password.' : e.message
        }
      },
    },
    h('h2', {}, 'Log in'),
    user,
    pass,
    h('button', { class: 'primary', type: 'submit', id: 'login-submit' }, 'Log in'),
    h('p', { class: 'muted' }, 'Local stack: the demo users and passwords are in <state>/auth/demo-passwords.txt.'),
    msg,
  )
  $view.replaceChildren(form)
  user.focus()
}

// ------------------------------------------------------------------------ worklist
async function showWorklist() {
  $view.replaceChildren(h('p', { class: 'muted' }, 'Loading the worklist…'))
  let list, rounds
  try {
    ;[list, rounds] = await Promise.all([api.worklist(state.filters), api.rounds().catch(() => ({ rounds: [] }))])
  } catch (e) {
    return showError(e)
  }
  const open = rounds.rounds.find((r) => r.state === 'open') || rounds.rounds[0]
  const roundLine = open
    ? `Round ${open.round_number} (${open.state}): budget ${(open.budget_fraction * 100).toFixed(0)} % = ${open.case_count} of ${open.candidate_count} case(s); ${open.accepted_count} accepted, ${open.revised_count} revised, ${open.unreviewed_count} to review`
    : 'No review round yet: the list is the whole ranking.'

  const organSel = h('select', { id: 'filter-organ' }, h('option', { value: '' }, 'all organs'), ...ORGANS.map(([, n]) => h('option', { value: n, selected: state.filters.organs[0] === n }, pretty(n))))
  const statusSel = h('select', { id: 'filter-status' }, h('option', { value: '' }, 'any status'), ...STATUSES.map((s) => h('option', { value: s, selected: state.filters.statuses[0] === s }, s)))
  const roundSel = h('select', { id: 'filter-round' }, h('option', { value: '0' }, 'all rounds'), ...rounds.rounds.map((r) => h('option', { value: r.round_number, selected: state.filters.round === r.round_number }, `round ${r.round_number}`)))
  const refilter = () => {
    state.filters = { organs: organSel.value ? [organSel.value] : [], statuses: statusSel.value ? [statusSel.value] : [], round: Number(roundSel.value) }
    showWorklist()
  }
  for (const s of [organSel, statusSel, roundSel]) s.addEventListener('change', refilter)

  const rows = list.items.map((item) => worklistRow(item))
  const table = h(
    'table',
    { class: 'worklist', id: 'worklist' },
    h('thead', {}, h('tr', {}, h('th', {}, '#'), h('th', {}, 'case'), h('th', {}, 'priority'), h('th', {}, 'status'), h('th', {}, 'why (per organ)'), h('th', {}, ''))),
    h('tbody', {}, rows),
  )
  $view.replaceChildren(
    h('div', { class: 'round', id: 'round' }, roundLine),
    h('div', { class: 'filters' }, 'Filter:', organSel, statusSel, roundSel, h('button', { onclick: () => showWorklist() }, 'Refresh'), h('span', { class: 'muted' }, `${list.total_size} case(s)`)),
    list.items.length ? table : h('p', { class: 'muted' }, 'Nothing to review with these filters.'),
  )
  atlasflow.ready = true
}

function worklistRow(item) {
  const mine = item.lease && item.lease.reviewer === state.me.subject
  const taken = item.status === 'leased' && !mine
  const done = item.status === 'accepted' || item.status === 'revised'
  const reasons = item.organs
    .filter((o) => o.reasons.length)
    .slice(0, 4)
    .map((o) => h('li', {}, o.reasons.join('; ')))
  let label = 'Open'
  if (taken) label = `Taken by ${item.lease.reviewer}`
  else if (mine) label = 'Resume'
  else if (done) label = 'View'
  return h(
    'tr',
    { class: taken ? 'taken' : '', 'data-case': item.case_id, 'data-rank': item.rank },
    h('td', {}, String(item.rank)),
    h('td', {}, h('code', {}, item.case_id)),
    h('td', {}, item.priority.toFixed(3)),
    h('td', {}, h('span', { class: `status ${item.status}` }, item.status), item.review ? h('div', { class: 'muted' }, `by ${item.review.reviewer}`) : null),
    h('td', {}, reasons.length ? h('ul', { class: 'reasons' }, reasons) : h('span', { class: 'muted' }, '—')),
    h('td', {}, h('button', { class: taken ? '' : 'primary', disabled: taken || done, 'data-open': item.case_id, onclick: () => openCase(item.case_id) }, label)),
  )
}

function openCase(caseId) {
  performance.clearMarks('case-drawn')
  performance.mark('case-open')
  go(`#/case/${caseId}`)
}

// ------------------------------------------------------------------------ case
async function showCase(caseId) {
  if (!performance.getEntriesByName('case-open').length) performance.mark('case-open')
  $view.replaceChildren(h('p', { class: 'muted' }, `Leasing ${caseId}…`))
  let item
  try {
    item = await api.lease(caseId, LEASE_SECONDS)
  } catch (e) {
    const taken = e.status === 409 || e.reason.includes('LEASE')
    $view.replaceChildren(
      h('p', { class: 'error', id: 'case-error' }, taken ? `This case is taken: ${e.message}` : e.message),
      h('button', { onclick: () => go('#/worklist') }, 'Back to the worklist'),
    )
    return
  }
  const ctx = {
    caseId,
    leased: true,
    timer: setInterval(() => api.renew(caseId, LEASE_SECONDS).catch((e) => status(`lease renewal failed: ${e.message}`)), RENEW_EVERY_MS),
    decisions: new Map(), // organ value -> 'accepted' | 'revised'
    edits: new Map(), // organ value -> native mask (Uint8Array)
    organSeconds: new Map(),
    selected: 0,
    selectedSince: performance.now(),
    openedAt: performance.now(),
    regionIndex: -1,
  }
  state.caseCtx = ctx
  let doc
  try {
    doc = await api.case(caseId)
  } catch (e) {
    return showError(e)
  }
  ctx.doc = doc
  ctx.versionId = doc.label_version.version_id
  const canvas = h('canvas', { id: 'gl', tabindex: '0' })
  const viewerBox = h('div', { class: 'viewer' }, canvas)
  const side = h('div', { class: 'side' })
  $view.replaceChildren(h('div', { class: 'case', id: 'case' }, viewerBox, side))
  const viewer = new Viewer(canvas)
  ctx.viewer = viewer
  atlasflow.viewer = viewer
  try {
    await viewer.load(doc.links, ctx.versionId, doc.has_attention_map)
  } catch (e) {
    return showError(e)
  }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))
  performance.mark('case-drawn')
  const m = performance.measure('case-load', 'case-open', 'case-drawn')
  atlasflow.loadTimes.push(m.duration)
  performance.clearMarks('case-open')
  ctx.regions = doc.organs.filter((o) => o.pointer).sort((a, b) => (b.score ?? b.attention_ml) - (a.score ?? a.attention_ml))
  renderSide(side, ctx)
  nextRegion(ctx) // start where the ranking points
  ctx.openedAt = performance.now()
  ctx.selectedSince = ctx.openedAt
  canvas.focus()
}

function status(text) {
  const el = document.getElementById('status-line')
  if (el) el.textContent = text
}

function organCtx(ctx, value) {
  return ctx.doc.organs.find((o) => ORGAN_VALUE[o.organ] === value)
}

function select(ctx, value) {
  const now = performance.now()
  if (ctx.selected) ctx.organSeconds.set(ctx.selected, (ctx.organSeconds.get(ctx.selected) || 0) + (now - ctx.selectedSince) / 1000)
  ctx.selected = value
  ctx.selectedSince = now
  refreshOrgans(ctx)
}

function renderSide(side, ctx) {
  const v = ctx.viewer
  const preset = (name) => h('button', { 'data-preset': name, class: v.preset === name ? 'on' : '', onclick: () => { v.setPreset(name); renderSide(side, ctx) } }, `${name} W${PRESETS[name].width}/L${PRESETS[name].level}`)
  const view = (name, key) => h('button', { 'data-view': name, class: v.view === name ? 'on' : '', title: key, onclick: () => { v.setView(name); renderSide(side, ctx) } }, name)
  const tool = (name, key) => h('button', { 'data-tool': name, class: v.tool === name && v.editing ? 'on' : '', disabled: !v.editing, title: key, onclick: () => setTool(ctx, name) }, name)
  ctx.organList = h('div', { id: 'organs' })
  side.replaceChildren(
    h('div', { class: 'box' }, h('h3', {}, 'Case'), h('div', {}, h('code', {}, ctx.caseId)), h('div', { class: 'muted' }, `rank ${ctx.doc.rank}, priority ${ctx.doc.priority.toFixed(3)}, label version ${ctx.versionId}`)),
    h('div', { class: 'box' }, h('h3', {}, 'Window'), h('div', { class: 'row' }, preset('abdomen'), preset('liver'), preset('bone'))),
    h('div', { class: 'box' }, h('h3', {}, 'View'), h('div', { class: 'row' }, view('axial', 'X'), view('coronal', 'C'), view('sagittal', 'V'), view('multiplanar', 'M'))),
    h(
      'div',
      { class: 'box' },
      h('h3', {}, 'Overlays'),
      h('div', { class: 'row' }, 'labels', h('input', { type: 'range', id: 'label-opacity', min: 0, max: 1, step: 0.05, value: v.labelOpacity, oninput: (e) => v.setLabelOpacity(Number(e.target.value)) })),
      v.heat
        ? h('div', { class: 'row' }, h('label', {}, h('input', { type: 'checkbox', id: 'heat-on', checked: v.heatOn, onchange: (e) => v.setHeat(e.target.checked) }), ' attention'), h('input', { type: 'range', min: 0, max: 1, step: 0.05, value: v.heatOpacity, oninput: (e) => v.setHeat(v.heatOn, Number(e.target.value)) }))
        : h('div', { class: 'muted' }, 'no attention map'),
      h('div', { class: 'row' }, h('button', { id: 'next-region', title: 'N', disabled: !ctx.regions.length, onclick: () => nextRegion(ctx) }, `Next attention region (${ctx.regions.length})`)),
    ),
    h('div', { class: 'box' }, h('h3', {}, 'Organs: show · decide'), ctx.organList),
    h(
      'div',
      { class: 'box' },
      h('h3', {}, 'Revise'),
      h('div', { class: 'row' }, tool('navigate', ''), tool('brush', 'B'), tool('eraser', 'E')),
      h('div', { class: 'row' }, 'size', h('input', { type: 'range', id: 'pen-size', min: 1, max: 30, step: 1, value: v.nv.opts.penSize, oninput: (e) => v.setPenSize(Number(e.target.value)) })),
      h('div', { class: 'row' }, h('button', { id: 'undo', disabled: !v.editing, title: 'Ctrl+Z', onclick: () => v.undo() }, 'Undo'), h('button', { id: 'redo', disabled: !v.editing, title: 'Ctrl+Y', onclick: () => v.redoStroke() }, 'Redo')),
    ),
    h(
      'div',
      { class: 'box' },
      h('div', { class: 'row' }, h('button', { class: 'primary', id: 'save', title: 'Ctrl+S', onclick: () => save(ctx) }, 'Save decisions'), h('button', { id: 'accept-case', onclick: () => acceptCase(ctx) }, 'Accept case as is'), h('button', { id: 'leave', onclick: () => go('#/worklist') }, 'Back')),
      h('div', { id: 'status-line' }),
    ),
  )
  refreshOrgans(ctx)
}

function refreshOrgans(ctx) {
  const v = ctx.viewer
  ctx.organList.replaceChildren(
    ...ORGANS.map(([value, name, rgb]) => {
      const o = organCtx(ctx, value)
      const decision = ctx.decisions.get(value)
      const row = h(
        'div',
        { class: `organ${ctx.selected === value ? ' selected' : ''}`, 'data-organ': name },
        h('input', { type: 'checkbox', title: 'show', checked: !v.hidden.has(value), onchange: (e) => v.setOrganVisible(value, e.target.checked) }),
        h('span', { class: 'swatch', style: `background: rgb(${rgb.join(',')})` }),
        h('span', { class: 'name', onclick: () => select(ctx, value) }, pretty(name), decision ? h('span', { class: `decision ${decision}` }, ` ${decision}`) : null),
        h('span', {}, h('button', { 'data-accept': name, title: 'A', onclick: () => accept(ctx, value) }, 'Accept'), ' ', h('button', { 'data-revise': name, class: v.editing === value ? 'on' : '', title: 'R', onclick: () => revise(ctx, value) }, 'Revise')),
        o && o.reasons.length ? h('span', { class: 'why' }, o.reasons.join('; ')) : null,
      )
      return row
    }),
  )
}

function stashEdit(ctx) {
  const v = ctx.viewer
  if (!v.editing) return
  ctx.edits.set(v.editing, v.editedMask())
  v.endEdit()
}

function accept(ctx, value) {
  if (ctx.viewer.editing === value) ctx.viewer.endEdit()
  ctx.edits.delete(value)
  ctx.decisions.set(value, 'accepted')
  select(ctx, value)
  status(`${pretty(ORGANS[value - 1][1])} accepted`)
}

function revise(ctx, value) {
  const v = ctx.viewer
  if (v.editing !== value) {
    stashEdit(ctx)
    v.beginEdit(value, ctx.edits.get(value), ORGANS[value - 1][2])
  }
  ctx.decisions.set(value, 'revised')
  select(ctx, value)
  setTool(ctx, 'brush')
}

function setTool(ctx, tool) {
  ctx.viewer.setTool(tool)
  const side = document.querySelector('.side')
  if (side) renderSide(side, ctx)
}

function nextRegion(ctx) {
  if (!ctx.regions.length) return
  ctx.regionIndex = (ctx.regionIndex + 1) % ctx.regions.length
  const o = ctx.regions[ctx.regionIndex]
  const w = o.pointer.world_box_mm
  ctx.viewer.goToMM([0, 1, 2].map((i) => (w.min[i] + w.max[i]) / 2))
  select(ctx, ORGAN_VALUE[o.organ])
  status(`region ${ctx.regionIndex + 1}/${ctx.regions.length}: ${pretty(o.organ)}, axial slices ${o.pointer.slices.first}–${o.pointer.slices.last}`)
}

async function save(ctx) {
  const v = ctx.viewer
  stashEdit(ctx)
  select(ctx, ctx.selected)
  if (ctx.decisions.size === 0) return status('Nothing decided yet: accept or revise an organ first.')
  const caseSeconds = (performance.now() - ctx.openedAt) / 1000
  const organs = []
  status('Saving…')
  for (const [value, decision] of ctx.decisions) {
    const name = ORGANS[value - 1][1]
    // an accepted organ is an all-zero delta: the organ confirmed as it is
    const mask = decision === 'revised' && ctx.edits.get(value) ? ctx.edits.get(value) : null
    const { b64, changed } = await xorDelta(v.labelData, value, mask || labelMask(v.labelData, value))
    organs.push({ organ: name, xor_delta_b64: b64, review_seconds: ctx.organSeconds.get(value) || 0, changed_voxels: changed })
  }
  try {
    const body = {
      parent_version_id: ctx.versionId,
      review_seconds: caseSeconds,
      complete: true,
      organs: organs.map(({ changed_voxels: _c, ...o }) => o),
    }
    const out = await api.revise(ctx.caseId, body)
    ctx.leased = false
    atlasflow.lastSaved = { version_id: out.version.version_id, organs: organs.map((o) => ({ organ: o.organ, changed_voxels: o.changed_voxels })) }
    status(`Saved version ${out.version.version_id}`)
    go('#/worklist')
  } catch (e) {
    status(`Save failed: ${e.message}`)
  }
}

function labelMask(labels, value) {
  const m = new Uint8Array(labels.length)
  for (let i = 0; i < labels.length; i++) m[i] = labels[i] === value ? 1 : 0
  return m
}

async function acceptCase(ctx) {
  try {
    await api.complete(ctx.caseId, 'accepted', ctx.versionId)
    ctx.leased = false
    go('#/worklist')
  } catch (e) {
    status(`Accept failed: ${e.message}`)
  }
}

async function leaveCase() {
  const ctx = state.caseCtx
  if (!ctx) return
  state.caseCtx = null
  clearInterval(ctx.timer)
  if (ctx.leased) {
    ctx.leased = false
    await api.release(ctx.caseId).catch(() => {})
  }
  if (ctx.viewer) ctx.viewer.dispose()
  atlasflow.viewer = null
}

// the lease is released when the page goes away (fetch keepalive: a DELETE with the CSRF header,
// which sendBeacon cannot send)
window.addEventListener('pagehide', () => {
  const ctx = state.caseCtx
  if (ctx && ctx.leased) {
    ctx.leased = false
    api.release(ctx.caseId, { keepalive: true }).catch(() => {})
  }
})

// ------------------------------------------------------------------------ keyboard
document.addEventListener('keydown', (e) => {
  if (e.target instanceof HTMLInputElement && e.target.type !== 'range' && e.target.type !== 'checkbox') return
  if (e.key === '?') return document.getElementById('help').showModal()
  const ctx = state.caseCtx
  if (!ctx || !ctx.viewer || !ctx.organList) return
  const v = ctx.viewer
  const ctrl = e.ctrlKey || e.metaKey
  const k = e.key.toLowerCase()
  let done = true
  if (ctrl && k === 's') save(ctx)
  else if (ctrl && k === 'z' && e.shiftKey) v.redoStroke()
  else if (ctrl && k === 'z') v.undo()
  else if (ctrl && k === 'y') v.redoStroke()
  else if (ctrl) done = false
  else if (k === 'n') nextRegion(ctx)
  else if (k === 'a' && ctx.selected) accept(ctx, ctx.selected)
  else if (k === 'r' && ctx.selected) revise(ctx, ctx.selected)
  else if (k === 'b') setTool(ctx, 'brush')
  else if (k === 'e') setTool(ctx, 'eraser')
  else if (k === '[') v.setPenSize(Math.max(1, v.nv.opts.penSize - 1))
  else if (k === ']') v.setPenSize(Math.min(30, v.nv.opts.penSize + 1))
  else if (k === '1' || k === '2' || k === '3') v.setPreset(['abdomen', 'liver', 'bone'][Number(k) - 1])
  else if (k === 'x') v.setView('axial')
  else if (k === 'c') v.setView('coronal')
  else if (k === 'v') v.setView('sagittal')
  else if (k === 'm') v.setView('multiplanar')
  else if (k === 'h') v.setHeat(!v.heatOn)
  else if (k === 'escape') go('#/worklist')
  else done = false
  if (done) e.preventDefault()
})

document.getElementById('help-btn').addEventListener('click', () => document.getElementById('help').showModal())
document.getElementById('logout').addEventListener('click', async () => {
  await leaveCase()
  await api.logout().catch(() => {})
  go('#/login')
})
window.addEventListener('hashchange', route)
route()
