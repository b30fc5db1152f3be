// A building deployment's page keeps itself current: its state, progress and instances
// from progress.json every second, until it is no longer building. (Without scripts, the
// page's <noscript> refresh does the same.) Text goes in through textContent only.
(function () {
  'use strict';

  const PERIOD_MS = 1000;
  const BUILDING = 'building';
  const INSTANCE_FIELDS = ['state', 'host', 'address', 'reason'];

  function setText(element, text) {
    if (element && element.textContent !== text) {
      element.textContent = text;
    }
  }

  function stateBadge(cell, state) {
    if (!cell) {
      return;
    }
    let badge = cell.querySelector('.state');
    if (!badge) {
      badge = document.createElement('span');
      cell.replaceChildren(badge);
    }
    badge.className = 'state state-' + state;
    setText(badge, state);
  }

  function summary(progress) {
    let text = (progress.active || 0) + ' of ' + (progress.total || 0) + ' active';
    if (progress.building) {
      text += ', ' + progress.building + ' building';
    }
    if (progress.unknown) {
      text += ', ' + progress.unknown + ' unknown';
    }
    if (progress.error) {
      text += ', ' + progress.error + ' in error';
    }
    if (progress.deleting) {
      text += ', ' + progress.deleting + ' deleting';
    }
    if (progress.deleted) {
      text += ', ' + progress.deleted + ' deleted';
    }
    return text;
  }

  function instanceRow(body, instance, index) {
    let row = null;
    for (const candidate of body.children) {
      if (candidate.dataset.name === instance.name) {
        row = candidate;
        break;
      }
    }
    if (!row) {
      row = document.createElement('tr');
      row.dataset.name = instance.name;
      const header = document.createElement('th');
      header.scope = 'row';
      header.dataset.field = 'name';
      header.textContent = instance.name;
      row.appendChild(header);
      for (const field of INSTANCE_FIELDS) {
        const cell = document.createElement('td');
        cell.dataset.field = field;
        row.appendChild(cell);
      }
    }
    if (body.children[index] !== row) {
      body.insertBefore(row, body.children[index] || null);
    }
    return row;
  }

  function show(section, deployment) {
    stateBadge(section.querySelector('[data-field="state"]'), deployment.state);
    setText(section.querySelector('[data-field="reason"]'), deployment.reason || '–');
    const progress = deployment.progress || {};
    const bar = document.getElementById('progress');
    if (bar) {
      bar.max = Math.max(1, progress.total || 0);
      bar.value = progress.active || 0;
    }
    setText(section.querySelector('[data-field="progress"]'), summary(progress));

    const body = document.querySelector('#instances tbody');
    if (!body) {
      return;
    }
    const names = new Set();
    deployment.instances.forEach((instance, index) => {
      names.add(instance.name);
      const row = instanceRow(body, instance, index);
      stateBadge(row.querySelector('[data-field="state"]'), instance.state);
      setText(row.querySelector('[data-field="host"]'), instance.host || '–');
      setText(row.querySelector('[data-field="address"]'), instance.address || '–');
      setText(row.querySelector('[data-field="reason"]'), instance.reason || '');
    });
    for (const row of Array.from(body.children)) {
      if (!names.has(row.dataset.name)) {
        row.remove();
      }
    }
  }

  function start() {
    const section = document.getElementById('deployment');
    if (!section || section.dataset.building !== 'true') {
      return;
    }
    const url = section.dataset.progressUrl;
    const round = () => {
      const started = Date.now();
      fetch(url, {credentials: 'same-origin', cache: 'no-store',
                  headers: {Accept: 'application/json'}})
        .then((response) => {
          if (response.status === 401) {
            window.location.assign('/dashboard/login?next=' +
                                   encodeURIComponent(window.location.pathname));
            return null;
          }
          if (!response.ok) {
            throw new Error('the server answered ' + response.status);
          }
          return response.json();
        })
        .then((deployment) => {
          if (deployment === null) {
            return false;
          }
          show(section, deployment);
          return deployment.state === BUILDING;
        })
        // A failed look is no reason to stop: the next one may get through.
        .catch(() => true)
        .then((again) => {
          if (again) {
            window.setTimeout(round, Math.max(0, PERIOD_MS - (Date.now() - started)));
          } else {
            section.dataset.building = 'false';
          }
        });
    };
    window.setTimeout(round, PERIOD_MS);
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
}());
